"""MoE RL with and without rollout routing replay (R3): the engine/trainer mismatch, same seed, same data.

Three GRPO runs of the recipe ``recipes/qwen3_moe_grpo_r3.yaml`` on a random-weight Qwen3-MoE, one
after the other in this process, from the same checkpoint, seed and prompts:

- **without R3**: the engine records each token's experts (so the routing mismatch can be
  measured) but the trainer routes with its own router, as a run without
  ``--use-rollout-routing-replay`` does (the same log-probs: the records only feed the metrics);
- **with R3**: ``--use-rollout-routing-replay``, every trainer forward replays the engine's experts;
- **GSPO with R3**: the same with ``--advantage-estimator gspo``.

Logged per step for each run (the run's ``metrics.jsonl``): ``rollout/raw_reward``,
``train/train_rollout_logprob_abs_diff``, ``train/mismatch_k3_kl``, ``train/routing_mismatch_frac``
(the fraction of (token, MoE layer) pairs whose experts *used* by the trainer form another top-k set
than the engine's: 0 under R3 by construction) and ``train/router_mismatch_frac`` (the same for the
trainer's *router*, before replay replaces its choice: what R3 overrides; equal to the former
without R3).

The reward is learnable by a random model: 1 when the response starts with a digit (the task's
prompts are ``"3+4=?"`` over a character tokenizer), so the reward column should rise.

Profiles:

- ``cpu``: the tiny world of ``examples/arith/prepare.py`` (hidden 32, 2 layers, 32 experts,
  top-2, fp32). On the CPU engine and trainer both run fp32 and agree to ~1e-7, so no router
  decision flips and R3 changes nothing; ``--engine-round bf16`` (this profile's default) rounds
  the engine's weights to bf16 after every weight push, standing in for the GPU's bf16 engine.
- ``gpu``: a random Qwen3-MoE of ``--hidden-size`` / ``--num-layers`` / ``--num-experts`` /
  ``--top-k`` (default 1024 / 8 / 64 / 8, ~0.8B parameters), bf16 engine and bf16 trainer compute
  (fp32 master weights); the mismatch is the real one between the engine's and the trainer's
  kernels. Defaults: 16 prompts x 8 samples, <= 16 tokens, lr 1e-5, 4 steps. (On the H100, 16
  layers with 32 x 8 samples of 32 tokens took ~30 s a step: see docs/moe.md.)

``ratio`` = mean ``mismatch_k3_kl`` without R3 / with R3 (> 1: R3 lowers the mismatch); the JSON
(DESIGN.md §11) holds both runs' per-step metrics and the GSPO run under ``gspo_r3``.

    python benchmarks/moe_routing_replay.py                          # CPU, tiny, ~10 s
    python benchmarks/moe_routing_replay.py --device-profile gpu     # H100: 1024 x 8 layers x 64 experts top-8
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, device_slug, device_string, print_table, write_results

RECIPE = REPO / "recipes" / "qwen3_moe_grpo_r3.yaml"
METRICS = ("rollout/raw_reward", "train/train_rollout_logprob_abs_diff", "train/mismatch_k3_kl",
           "train/router_mismatch_frac", "train/routing_mismatch_frac", "train/grad_norm",
           "rollout/response_len/mean", "perf/step_time", "perf/rollout_time", "perf/train_time",
           "perf/update_weights_time")  # fmt: skip
MODEL_KEYS = ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "num_attention_heads", "vocab_size")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-profile", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default 4)")
    p.add_argument(
        "--gspo-steps", type=int, default=None, help="steps of the GSPO run (default --steps; 0 skips)"
    )
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (cpu: the recipe's, gpu 16)")
    p.add_argument("--samples", type=int, default=None, help="samples per prompt (cpu: the recipe's, gpu 8)")
    p.add_argument("--max-response-len", type=int, default=None, help="cpu: the recipe's, gpu 16")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's (cpu), 1e-5 (gpu)")
    p.add_argument(
        "--max-tokens-per-gpu", type=int, default=None, help="packed micro-batch tokens (gpu 16384)"
    )
    p.add_argument("--hidden-size", type=int, default=1024, help="gpu profile model shape")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--moe-intermediate-size", type=int, default=512)
    p.add_argument("--engine-round", choices=["none", "bf16", "router-bf16"], default=None,
                   help="round the engine's (router) weights to bf16 after each push (cpu default bf16, gpu none)")  # fmt: skip
    p.add_argument("--expert-impl", choices=["grouped", "reference"], default="grouped")
    p.add_argument("--deadline-s", type=float, default=None, help="skip the GSPO run past this many seconds")
    p.add_argument("--out-dir", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--keep-dir", default=None, help="work directory to keep (world, run dirs)")
    p.add_argument("--no-write", action="store_true", help="print only, write no results JSON")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- world


def _prepare_module() -> Any:
    spec = importlib.util.spec_from_file_location("arith_prepare", REPO / "examples" / "arith" / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_world(out: Path) -> Path:
    """The CPU recipe's world: ``python examples/arith/prepare.py --out OUT --hidden-size 32
    --num-layers 2 --num-experts 32`` (a top-2 Qwen3-MoE of 32 experts; fp32)."""
    if not (out / "model" / "config.json").is_file():
        _prepare_module().main(["--out", str(out), "--num-train", "256", "--num-eval", "8", "--num-sft", "8",
                                "--hidden-size", "32", "--num-layers", "2", "--num-experts", "32"])  # fmt: skip
    return out


def make_gpu_world(out: Path, args: argparse.Namespace, device: str = "cuda") -> tuple[Path, int]:
    """A random Qwen3-MoE of the flags' shape (bf16 safetensors) with the arith tokenizer and
    prompts; returns the world and the parameter count."""
    import random

    import torch

    from miles.models.loading import build_model, save_hf
    from miles.models.spec import ModelSpec

    prep = _prepare_module()
    tok_dir, model_dir = out / "tokenizer", out / "model"
    vocab = prep.build_tokenizer(tok_dir)
    cfg = prep.model_config(vocab, args.hidden_size, args.num_layers, args.num_experts)
    heads = max(args.hidden_size // 128, 4)
    cfg.update(num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate_size,
               intermediate_size=4 * args.moe_intermediate_size, num_attention_heads=heads,
               num_key_value_heads=max(heads // 4, 1), head_dim=128, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(ModelSpec.from_hf_config(cfg), device=device)
    params = sum(t.numel() for t in model.parameters())
    save_hf(model, model_dir, dtype="bfloat16")
    for f in tok_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    prep.write_jsonl(out / "train.jsonl", prep.make_problems(4096, 9, random.Random(0)))
    return out, params


# --------------------------------------------------------------------------- one run


def round_engine_weights(engine_model: Any, which: str) -> None:
    """Round the engine's weights to bf16 in place (kept in their dtype): ``bf16`` all of them (a
    bf16 engine's weights), ``router-bf16`` the routers only (``mlp.gate.weight``)."""
    import torch

    with torch.no_grad():
        for name, p in engine_model.named_parameters():
            if which == "bf16" or name.endswith("mlp.gate.weight"):
                p.copy_(p.to(torch.bfloat16).to(p.dtype))


def run_one(argv: list[str], *, replay: bool, engine_round: str = "none") -> list[dict[str, float]]:
    """One ``miles train`` run (``argv`` without the subcommand) in the embedded placement, the
    engine always recording routing, the trainer replaying it only with ``replay``; returns the
    per-step rows of its ``metrics.jsonl``."""
    import torch

    from miles.config import parse_train_args
    from miles.orchestrate.local import LocalPlacement
    from miles.orchestrate.loop import Run, load_rollout_data, train_loop
    from miles.utils.metrics import MetricsLogger, read_metrics

    config = parse_train_args([*argv, "--use-rollout-routing-replay"])  # the engine records experts
    run_dir = Path(config.log.run_dir or "")
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    data = load_rollout_data(config)
    placement = LocalPlacement.start(config, data.demand, tokenizer=data.tokenizer)
    placement.trainer.use_rollout_routing_replay = replay
    if engine_round != "none":
        engine_model = placement.engine.engine.model
        round_engine_weights(engine_model, engine_round)
        push = placement.push_weights

        def push_and_round(version: int) -> float:
            seconds = push(version)
            round_engine_weights(engine_model, engine_round)  # the loop generates only after this returns
            return seconds

        placement.push_weights = push_and_round  # type: ignore[method-assign]
    logger = MetricsLogger(run_dir)
    try:
        train_loop(Run.assemble(config, data, placement), logger)
    finally:
        logger.close()
        placement.stop()
        del placement
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return read_metrics(run_dir)


def summarize(rows: list[dict[str, float]], name: str) -> dict[str, Any]:
    per_step = {k.split("/", 1)[1]: [float(r.get(k, math.nan)) for r in rows] for k in METRICS}
    out: dict[str, Any] = {"name": name, "steps": len(rows)}
    for key, values in per_step.items():
        out[f"{key}_mean"] = statistics.fmean(values) if values else math.nan
    k3 = out["mismatch_k3_kl_mean"]
    out["inverse_mismatch_k3_kl"] = 1.0 / k3 if k3 > 0 else math.inf
    out["per_step"] = per_step
    return out


# --------------------------------------------------------------------------- main


def recipe_argv(world: Path, run_dir: Path, steps: int, args: argparse.Namespace) -> list[str]:
    argv = ["--config", str(RECIPE), "--hf-checkpoint", str(world / "model"),
            "--prompt-data", str(world / "train.jsonl"),
            "--num-rollout", str(steps), "--run-dir", str(run_dir)]  # fmt: skip
    for flag, value in (
        ("--rollout-batch-size", args.prompts),
        ("--n-samples-per-prompt", args.samples),
        ("--rollout-max-response-len", args.max_response_len),
        ("--lr", args.lr),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.max_tokens_per_gpu is not None:
        argv += ["--use-dynamic-batch-size", "--max-tokens-per-gpu", str(args.max_tokens_per_gpu)]
    return argv


def write_partial(
    results: dict[str, dict[str, Any]], config: dict[str, Any], device: str, args: argparse.Namespace
) -> None:
    """The runs finished so far, as ``...-partial.json`` next to the results: a run cut short by a
    time limit still leaves its per-step metrics (the final JSON replaces it)."""
    if not args.no_write:
        record = {"benchmark": "moe_routing_replay", "device": device, "partial": True, "config": config,
                  "runs": results}  # fmt: skip
        _partial_path(device, args).write_text(json.dumps(record, indent=2) + "\n")


def _partial_path(device: str, args: argparse.Namespace) -> Path:
    out = Path(args.out_dir) if args.out_dir else Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    return out / f"moe_routing_replay-{device_slug(device)}-{datetime.date.today().isoformat()}-partial.json"


def report(
    results: dict[str, dict[str, Any]],
    config: dict[str, Any],
    device: str,
    args: argparse.Namespace,
    quiet: bool = False,
) -> Path | None:
    """Print the per-step table (unless ``quiet``) and write the JSON (unless ``--no-write``)."""
    off, r3 = results["off"], results["r3"]
    if not quiet:
        print(f"moe_routing_replay on {device}: {config['model']}, {config['steps']} steps, "
              f"engine_round={config['engine_round']}")  # fmt: skip
        headers = ["run", "step", "reward", "|dlogp|", "k3 KL", "router mismatch", "used mismatch", "s",
                   "rollout s", "train s"]  # fmt: skip
        table = []
        for res in results.values():
            ps = res["per_step"]
            for i in range(res["steps"]):
                table.append([res["name"], i, ps["raw_reward"][i], f"{ps['train_rollout_logprob_abs_diff'][i]:.3e}",
                              f"{ps['mismatch_k3_kl'][i]:.3e}", f"{ps['router_mismatch_frac'][i]:.4f}",
                              f"{ps['routing_mismatch_frac'][i]:.4f}", ps["step_time"][i],
                              ps["rollout_time"][i], ps["train_time"][i]])  # fmt: skip
        print_table(headers, table)
        k3_off, k3_r3 = off["mismatch_k3_kl_mean"], r3["mismatch_k3_kl_mean"]
        print(f"ratio (mean k3 KL without R3 / with R3): {k3_off / k3_r3 if k3_r3 > 0 else math.inf:.2f}x; "
              f"mean |dlogp| {off['train_rollout_logprob_abs_diff_mean']:.3e} -> "
              f"{r3['train_rollout_logprob_abs_diff_mean']:.3e}")  # fmt: skip
    if args.no_write:
        return None
    d_r3 = r3["train_rollout_logprob_abs_diff_mean"]
    path = write_results(
        "moe_routing_replay", device, config, r3, off, "inverse_mismatch_k3_kl",
        extra={"gspo_r3": results.get("gspo"),
               "ratio_definition": "mean train/mismatch_k3_kl without R3 / with R3 (> 1: R3 lowers it)",
               "ratio_logprob_abs_diff": off["train_rollout_logprob_abs_diff_mean"] / d_r3 if d_r3 > 0 else math.inf},
        out_dir=Path(args.out_dir) if args.out_dir else Path(__file__).resolve().parent / "results",
    )  # fmt: skip
    if not quiet:
        _partial_path(device, args).unlink(missing_ok=True)
        print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    gpu = args.device_profile == "gpu"
    if gpu:
        args.prompts, args.samples = args.prompts or 16, args.samples or 8
        args.max_response_len, args.lr = args.max_response_len or 16, args.lr or 1e-5
        args.max_tokens_per_gpu = args.max_tokens_per_gpu or 16384
    steps = args.steps or 4
    gspo_steps = steps if args.gspo_steps is None else args.gspo_steps
    engine_round = args.engine_round or ("none" if gpu else "bf16")
    import torch

    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device-profile gpu needs CUDA")
    if not gpu and torch.cuda.is_available():
        raise SystemExit("--device-profile cpu on a CUDA machine: run with CUDA_VISIBLE_DEVICES=''")
    from miles.models.moe import SparseMoeBlock

    SparseMoeBlock.expert_impl = args.expert_impl
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the reward hook is this module, imported by package path
    start = time.perf_counter()
    device = device_string("cuda" if gpu else "cpu")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep_dir) if args.keep_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        params: int | None = None
        if gpu:
            world, params = make_gpu_world(work / "world", args)
        else:
            world = make_tiny_world(work / "world")
        model_cfg = json.loads((world / "model" / "config.json").read_text())
        config = {
            "profile": args.device_profile,
            "recipe": str(RECIPE.relative_to(REPO)),
            "model": {k: model_cfg[k] for k in MODEL_KEYS},
            "parameters": params,
            "engine_dtype": "bfloat16" if gpu else "float32",
            "trainer_compute_dtype": "bfloat16 (fp32 master weights)" if gpu else "float32",
            "engine_round": engine_round,
            "expert_impl": args.expert_impl,
            "steps": steps,
            "gspo_steps": 0,
            "reward": "1 if the response starts with a digit",
            "overrides": {
                "prompts": args.prompts,
                "samples": args.samples,
                "max_response_len": args.max_response_len,
                "lr": args.lr,
                "max_tokens_per_gpu": args.max_tokens_per_gpu,
            },
            "command": "python benchmarks/moe_routing_replay.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
        }
        print(f"world ready at {time.perf_counter() - start:.0f} s", flush=True)
        for key, name, replay in (("off", "GRPO without R3", False), ("r3", "GRPO with R3", True)):
            rows = run_one(
                recipe_argv(world, work / key, steps, args), replay=replay, engine_round=engine_round
            )
            results[key] = summarize(rows, name)
            print(f"{name}: done at {time.perf_counter() - start:.0f} s", flush=True)
            write_partial(results, config, device, args)
        config["wall_s"] = round(time.perf_counter() - start, 1)
        report(results, config, device, args, quiet=True)  # kept if the GSPO run does not finish
        late = args.deadline_s is not None and time.perf_counter() - start > args.deadline_s
        if gspo_steps > 0 and not late:
            argv_gspo = [
                *recipe_argv(world, work / "gspo", gspo_steps, args),
                "--advantage-estimator",
                "gspo",
            ]
            results["gspo"] = summarize(
                run_one(argv_gspo, replay=True, engine_round=engine_round), "GSPO with R3"
            )
            config["gspo_steps"] = gspo_steps
        elif gspo_steps > 0:
            print(f"GSPO run skipped: past --deadline-s {args.deadline_s}")
    config["wall_s"] = round(time.perf_counter() - start, 1)
    report(results, config, device, args)
    return results


if __name__ == "__main__":
    main()

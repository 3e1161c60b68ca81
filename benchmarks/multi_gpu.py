"""Multi-GPU validation on one host (2+ GPUs): FSDP2 over NCCL, the Ray placement disaggregated
(trainer on GPU 0, engine on GPU 1), broadcast weight sync, true-on-policy across processes, and
an engine killed mid-rollout. One command, one JSON (``benchmark: "multi_gpu"``).

    python benchmarks/multi_gpu.py --parts fsdp,grpo,top,kill,sync --out-dir DIR

Parts:

- ``fsdp``: one optimizer step of a Qwen3-0.6B-shaped model (bf16 compute, fp32 masters) on the
  same global batch with 1 and with 2 GPUs (NCCL): loss, grad norm and updated weights agree
  within bf16 tolerance; tokens/s of each (baseline: 1 GPU, same run).
- ``grpo``: ``--grpo-steps`` GRPO steps, Ray placement, engine on its own GPU, weights broadcast
  over NCCL; the reward (1 when the response starts with a digit, learnable from random weights)
  must rise.
- ``top``: the same in ``--true-on-policy-mode``: ``train/train_rollout_logprob_abs_diff`` must be
  exactly 0.0 on every step although engine and trainer run in different processes.
- ``kill``: ``--use-fault-tolerance``; the engine is SIGKILLed while it has requests in flight;
  the run completes with every sample (none lost, none duplicated).
- ``sync``: broadcast weight-sync seconds (NCCL, trainer GPU 0 -> engine GPU 1) for Qwen3-0.6B-
  and Qwen3-1.7B-shaped models (random weights).

Environment: keep NVLink multicast off (``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NVSHMEM_DISABLE_NVLS=1``); the script sets them for itself and every process it starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_k, _v)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import device_string, write_results  # noqa: E402
from benchmarks.train_throughput import COMMON, MODELS  # noqa: E402
from miles.rollout.dump import load_rollout_dump  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-moe-small": {**COMMON, **MODELS["qwen3-moe-small"]},
    "qwen3-0.6b-shape": {**COMMON, **MODELS["qwen3-0.6b-shape"]},
    "qwen3-1.7b-shape": {
        **COMMON,
        **MODELS["qwen3-0.6b-shape"],
        "hidden_size": 2048,
        "intermediate_size": 6144,
    },
}


# ---- FSDP2 over 1 and 2 GPUs ---------------------------------------------------------------------


def _fsdp_rank(
    rank: int, world: int, init: str, out: str, seqs: int, seq_len: int, steps: int, shape: str, ep: int
) -> None:
    import torch.distributed as dist

    from miles.buffer.batching import build_train_batch
    from miles.config import AlgoConfig, TrainConfig
    from miles.models.loading import build_model
    from miles.models.spec import ModelSpec
    from miles.train.expert_parallel import full_state_items
    from miles.train.packing import batch_to, shard_for_rank
    from miles.train.parallelize import parallelize
    from miles.train.trainer import Trainer
    from miles.types import Group, Sample, SampleStatus

    cuda = torch.cuda.is_available()  # without GPUs (--smoke-on-cpu): gloo ranks on the CPU
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=world
    )
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    cfg = SHAPES[shape]
    model = build_model(ModelSpec.from_hf_config(cfg)).to(device)
    model = parallelize(model, param_dtype=torch.bfloat16, expert_parallel_size=ep)
    train = TrainConfig(lr=1e-5, use_dynamic_batch_size=True, max_tokens_per_gpu=8192, weight_decay=0.0,
                        calculate_per_token_loss=True, seed=0)  # fmt: skip
    trainer = Trainer(model, train, AlgoConfig(), device)
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(seqs):
        ids = torch.randint(0, int(cfg["vocab_size"]), (seq_len,), generator=g).tolist()
        half = seq_len // 2
        samples.append(Sample(prompt_ids=ids[:half], response_ids=ids[half:], index=i, group_index=i // 4,
                              rollout_logprobs=[-1.0] * (seq_len - half), reward=float(i % 2),
                              status=SampleStatus.COMPLETED))  # fmt: skip
    groups = [Group(j, tuple(samples[4 * j : 4 * j + 4])) for j in range(seqs // 4)]
    batch = build_train_batch(groups)
    batch = batch_to(
        dataclasses.replace(batch, advantages=torch.randn(batch.num_tokens, generator=g)), device
    )
    shard = shard_for_rank(batch, rank, world)
    first = trainer.train_step(shard, on_policy=True)
    # Collective on every rank: FSDP shards and (under EP) other ranks' experts gathered.
    params = {n: t.float().cpu() for n, t in full_state_items(trainer.model)
              if "layers.0." in n or "norm" in n}  # fmt: skip
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(shard, on_policy=True)
    sync()
    seconds = (time.perf_counter() - start) / steps
    if rank == 0:
        torch.save({"first": first, "params": params, "tokens_per_s": batch.num_tokens / seconds,
                    "step_s": seconds, "tokens": batch.num_tokens}, f"{out}/{shape}_{world}_{ep}.pt")  # fmt: skip
    dist.destroy_process_group()


def part_fsdp(
    out: Path, seqs: int, seq_len: int, steps: int, shape: str = "qwen3-0.6b-shape", ep2: int = 1
) -> dict[str, Any]:
    """1 GPU against 2 GPUs (with ``ep2`` > 1: experts sharded over the two) on one global batch."""
    import torch.multiprocessing as mp

    res = {}
    for world, ep in ((1, 1), (2, ep2)):
        mp.spawn(_fsdp_rank, args=(world, str(out / f"init_{shape}_{world}"), str(out), seqs, seq_len, steps,
                                   shape, ep), nprocs=world, join=True)  # fmt: skip
        res[world] = torch.load(out / f"{shape}_{world}_{ep}.pt", weights_only=False)
    one, two = res[1], res[2]
    diffs = {n: (two["params"][n] - p).abs().max().item() / max(p.abs().max().item(), 1e-12)
             for n, p in one["params"].items()}  # fmt: skip
    return {
        "loss_1gpu": one["first"]["train/loss"], "loss_2gpu": two["first"]["train/loss"],
        "grad_norm_1gpu": one["first"]["train/grad_norm"], "grad_norm_2gpu": two["first"]["train/grad_norm"],
        "max_rel_param_diff": max(diffs.values()),
        "tokens_per_s_1gpu": one["tokens_per_s"], "tokens_per_s_2gpu": two["tokens_per_s"],
        "scaling_2gpu": two["tokens_per_s"] / one["tokens_per_s"], "global_tokens": one["tokens"],
    }  # fmt: skip


# ---- Ray placement parts -------------------------------------------------------------------------


def _world(out: Path) -> Path:
    import subprocess

    world = out / "arith"
    if not (world / "model").is_dir():
        subprocess.run([sys.executable, "examples/arith/prepare.py", "--out", str(world), "--num-train", "2048",
                        "--num-eval", "8", "--num-sft", "8", "--hidden-size", "128", "--num-layers", "4",
                        "--num-experts", "8"], check=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    return world


def _argv(world: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--hf-checkpoint", str(world / "model"), "--prompt-data", str(world / "train.jsonl"),
            "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
            "--rm-type", "starts_with_digit", "--rollout-batch-size", "16",
            "--n-samples-per-prompt", "8", "--rollout-max-response-len", "8", "--lr", "1e-3",
            "--use-dynamic-batch-size", "--max-tokens-per-gpu", "4096",
            "--placement-backend", "ray", "--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1",
            "--run-dir", str(run_dir), "--overwrite", *extra]  # fmt: skip


def _run(argv: list[str], during: Any = None) -> tuple[list[dict[str, Any]], Any]:
    from miles.config import parse_train_args
    from miles.orchestrate.loop import Run, load_rollout_data, train_loop
    from miles.orchestrate.ray import RayPlacement
    from miles.utils.metrics import MetricsLogger, read_metrics

    config = parse_train_args(argv)
    run_dir = Path(config.log.run_dir)
    data = load_rollout_data(config)
    placement = RayPlacement.start(config, data.demand, run_dir=run_dir)
    logger = MetricsLogger(run_dir)
    try:
        if during is not None:
            during(placement)
        train_loop(Run.assemble(config, data, placement), logger)
        placement.wait_in_service()
    finally:
        logger.close()
        placement.stop()
    return read_metrics(run_dir), placement


def part_grpo(out: Path, steps: int, *extra: str, name: str = "grpo") -> dict[str, Any]:
    world = _world(out)
    rows, _ = _run(_argv(world, out / name, "--num-rollout", str(steps), *extra))
    rewards = [r["rollout/raw_reward"] for r in rows]
    k = max(1, min(3, len(rows) // 3))
    return {
        "steps": len(rows), "reward_first": statistics.fmean(rewards[:k]), "reward_last": statistics.fmean(rewards[-k:]),
        "rewards": rewards, "update_weights_s": statistics.median(r["perf/update_weights_time"] for r in rows),
        "step_s": statistics.median(r["perf/step_time"] for r in rows),
        "max_logprob_abs_diff": max(r["train/train_rollout_logprob_abs_diff"] for r in rows),
        "first_ppo_kl": rows[0].get("train/ppo_kl"),
    }  # fmt: skip


def part_kill(out: Path) -> dict[str, Any]:

    world = _world(out)
    done = threading.Event()
    fired: list[int | None] = []

    def watch(placement: Any) -> None:
        def kill() -> None:
            fired.append(placement.kill_engine_when_busy(0, 1, done))

        threading.Thread(target=kill, daemon=True).start()

    dump = out / "kill_dump"
    rows, placement = _run(_argv(world, out / "kill", "--num-rollout", "3", "--use-fault-tolerance",
                                 "--rollout-health-check-interval", "0.5", "--rollout-health-check-timeout", "5",
                                 "--rollout-max-response-len", "64", "--save-debug-rollout-data", str(dump)),
                           during=watch)  # fmt: skip
    done.set()
    samples = [s for step in range(3) for g in load_rollout_dump(dump / f"rollout_{step}.pt")
               for s in g.samples]  # fmt: skip
    indices = sorted(s.index for s in samples)
    return {
        "killed_at_version": fired[0] if fired else None, "recoveries": placement.monitor.recoveries,
        "failed_samples": sum(r["rollout/failed_samples"] for r in rows), "samples": len(samples),
        "every_sample_once": indices == list(range(len(samples))),
    }  # fmt: skip


def part_sync(out: Path, shapes: list[str], repeats: int) -> dict[str, Any]:
    from miles.config import parse_train_args
    from miles.models.loading import build_model
    from miles.models.spec import ModelSpec
    from miles.orchestrate.loop import load_rollout_data
    from miles.orchestrate.ray import RayPlacement

    world = _world(out)
    res: dict[str, Any] = {}
    for shape in shapes:
        spec = ModelSpec.from_hf_config(SHAPES[shape])
        with torch.device("meta"):
            nbytes = 2 * sum(t.numel() for t in build_model(spec).parameters())  # bf16, tied once
        model_dir = _shape_dir(out, world, shape)
        argv = _argv(world, out / f"sync_{shape}", "--num-rollout", "1", "--sglang-max-total-tokens", "4096")
        argv[argv.index("--hf-checkpoint") + 1] = str(model_dir)
        config = parse_train_args(argv)
        placement = RayPlacement.start(
            config, load_rollout_data(config).demand, run_dir=out / f"sync_{shape}"
        )
        try:
            times = [placement.push_weights(v + 1) for v in range(repeats)]
        finally:
            placement.stop()
        res[shape] = {"seconds": times, "median_s": statistics.median(times[1:] or times), "bytes": nbytes,
                      "gb_per_s": nbytes / statistics.median(times[1:] or times) / 1e9}  # fmt: skip
    return res


def part_coloc(out: Path, steps: int) -> dict[str, Any]:
    """One GPU: the Ray placement colocated (trainer and engine actors share the GPU, CUDA-IPC
    weight hand-over, offload between phases) against the embedded placement, same config, in
    true-on-policy mode (the arith model is a Qwen3-MoE: the MoE bf16 exactness check too)."""
    from miles.config import parse_train_args
    from miles.orchestrate.loop import run_train
    from miles.utils.metrics import read_metrics

    world = _world(out)
    flags = ("--num-rollout", str(steps), "--true-on-policy-mode", "--colocate")
    rows, placement = _run(_argv(world, out / "coloc_ray", *flags))
    local = _argv(world, out / "coloc_local", *flags)
    local[local.index("--placement-backend") + 1] = "local"
    run_train(parse_train_args(local))
    base = read_metrics(out / "coloc_local")

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        later = rs[1:] or rs
        return {"step_s": statistics.median(r["perf/step_time"] for r in later),
                "update_weights_s": statistics.median(r["perf/update_weights_time"] for r in later),
                "max_logprob_abs_diff": max(r["train/train_rollout_logprob_abs_diff"] for r in rs),
                "rewards": [r["rollout/raw_reward"] for r in rs]}  # fmt: skip

    return {"ray_colocated": {**summary(rows), "transport": placement.transport}, "embedded": summary(base)}


def part_coloc_sync(out: Path, shapes: list[str], repeats: int) -> dict[str, Any]:
    """One GPU, colocated: CUDA-IPC weight sync, trainer sleep/wake, engine release/resume."""
    import httpx

    from miles.config import parse_train_args
    from miles.orchestrate.loop import load_rollout_data
    from miles.orchestrate.ray import RayPlacement

    world = _world(out)
    res: dict[str, Any] = {}
    for shape in shapes:
        model_dir = _shape_dir(out, world, shape)
        argv = _argv(
            world,
            out / f"csync_{shape}",
            "--num-rollout",
            "1",
            "--colocate",
            "--sglang-max-total-tokens",
            "4096",
        )
        argv[argv.index("--hf-checkpoint") + 1] = str(model_dir)
        config = parse_train_args(argv)
        placement = RayPlacement.start(
            config, load_rollout_data(config).demand, run_dir=out / f"csync_{shape}"
        )
        url = placement.engine_urls[0]
        admin = {"Authorization": f"Bearer {placement.admin_key}"}  # memory calls are admin endpoints
        sync, sleep, wake, release, resume = [], [], [], [], []
        try:
            for v in range(repeats):
                sync.append(max(placement._on_trainers("push_weights", v + 1, [url])))
                start = time.perf_counter()
                placement._on_trainers("sleep")
                sleep.append(time.perf_counter() - start)
                start = time.perf_counter()
                placement._on_trainers("wake_up")
                wake.append(time.perf_counter() - start)
                start = time.perf_counter()
                httpx.post(
                    f"{url}/release_memory_occupation", json={}, headers=admin, timeout=300
                ).raise_for_status()
                release.append(time.perf_counter() - start)
                start = time.perf_counter()
                httpx.post(
                    f"{url}/resume_memory_occupation", json={}, headers=admin, timeout=300
                ).raise_for_status()
                resume.append(time.perf_counter() - start)
        finally:
            placement.stop()
        med = statistics.median
        res[shape] = {"sync_s": sync, "sync_median_s": med(sync[1:] or sync), "trainer_sleep_s": med(sleep),
                      "trainer_wake_s": med(wake), "engine_release_s": med(release),
                      "engine_resume_s": med(resume)}  # fmt: skip
    return res


def _shape_dir(out: Path, world: Path, shape: str) -> Path:
    from miles.models.loading import build_model, save_hf
    from miles.models.spec import ModelSpec

    model_dir = out / shape
    if not model_dir.is_dir():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = build_model(ModelSpec.from_hf_config(SHAPES[shape]))
        save_hf(model.to(torch.bfloat16), model_dir, tokenizer_source=str(world / "model"))
        del model
        torch.cuda.empty_cache()
    return model_dir


def _headline(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(miles, baseline, headline key)``: 2-GPU over 1-GPU tokens/s of the ``fsdp`` part (else
    ``ep``); for the one-GPU parts, steps/s of the Ray placement over the embedded one's."""
    for part in ("fsdp", "ep"):
        r = results.get(part, {})
        if "tokens_per_s_2gpu" in r:
            return ({"tokens_per_s_2gpu": r["tokens_per_s_2gpu"], **results},
                    {"tokens_per_s_2gpu": r["tokens_per_s_1gpu"]}, "tokens_per_s_2gpu")  # fmt: skip
    coloc = results.get("coloc", {})
    if "ray_colocated" in coloc:
        # Steps per second: higher is better, as write_results' ratio expects.
        return ({"steps_per_s": 1 / coloc["ray_colocated"]["step_s"], **results},
                {"steps_per_s": 1 / coloc["embedded"]["step_s"]}, "steps_per_s")  # fmt: skip
    return {"none": 0.0, **results}, {"none": 1.0}, "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="fsdp,grpo,top,kill,sync")
    p.add_argument("--out-dir", default="runs/multi_gpu")
    p.add_argument("--grpo-steps", type=int, default=20)
    p.add_argument("--fsdp-seqs", type=int, default=16)
    p.add_argument("--fsdp-seq-len", type=int, default=1024)
    p.add_argument("--fsdp-steps", type=int, default=3)
    p.add_argument("--sync-shapes", default="qwen3-0.6b-shape,qwen3-1.7b-shape")
    p.add_argument("--sync-repeats", type=int, default=3)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--coloc-steps", type=int, default=4)
    p.add_argument(
        "--benchmark", default="multi_gpu", help="results name (ray_colocated for the 1-GPU parts)"
    )
    p.add_argument(
        "--smoke-on-cpu", action="store_true", help="run the Ray parts on CPU (a check of the script)"
    )
    args = p.parse_args()
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    one_gpu = set(parts) <= {"coloc", "coloc_sync"}
    if torch.cuda.device_count() < (1 if one_gpu else 2) and not args.smoke_on_cpu:
        raise SystemExit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    results: dict[str, Any] = {}

    def record(name: str, fn: Any) -> None:
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # one part failing must not hide the others' figures
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results[name]["wall_s"] = time.perf_counter() - start
        print(f"== {name}: {json.dumps(results[name], default=str)}", flush=True)
        (out / "partial.json").write_text(json.dumps(results, indent=2, default=str))
        if args.results_dir:
            Path(args.results_dir, f"{args.benchmark}-partial.json").write_text(
                json.dumps(results, indent=2, default=str)
            )

    runs = {
        "fsdp": lambda: part_fsdp(out, args.fsdp_seqs, args.fsdp_seq_len, args.fsdp_steps),
        "ep": lambda: part_fsdp(
            out, args.fsdp_seqs, args.fsdp_seq_len, args.fsdp_steps, "qwen3-moe-small", 2
        ),
        "grpo": lambda: part_grpo(out, args.grpo_steps),
        "top": lambda: part_grpo(out, 3, "--true-on-policy-mode", name="top"),
        "kill": lambda: part_kill(out),
        "sync": lambda: part_sync(out, args.sync_shapes.split(","), args.sync_repeats),
        "coloc": lambda: part_coloc(out, args.coloc_steps),
        "coloc_sync": lambda: part_coloc_sync(out, args.sync_shapes.split(","), args.sync_repeats),
    }
    unknown = [p for p in parts if p not in runs]
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; choose from {sorted(runs)}")
    for name in parts:  # in the order given: the most wanted first, in case time runs out
        record(name, runs[name])
    miles, baseline, headline = _headline(results)
    device = (
        f"{torch.cuda.device_count()}x {device_string('cuda')}"
        if torch.cuda.is_available()
        else device_string()
    )
    path = write_results(args.benchmark, device, vars(args), miles,
                         baseline, headline, packages=("torch", "ray"),
                         out_dir=Path(args.results_dir) if args.results_dir else out)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

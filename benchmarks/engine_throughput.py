"""Offline generation throughput: the Miles engine vs ``transformers`` ``generate``, same run.

The shape of nano-vllm's ``bench.py`` scaled by flags: ``--num-requests`` random prompts of
``--min/max-input-len`` tokens, each generating a random ``--min/max-output-len`` tokens with
``ignore_eos`` (greedy). Miles gets every request at once (continuous batching). The baseline
runs static batches of ``--hf-batch-size`` requests in the same order, each batch generating
its longest request's length; only the tokens the requests asked for count as output for both.

    python benchmarks/engine_throughput.py --num-requests 64
    python benchmarks/engine_throughput.py --model qwen3-0.6b-shape --device cuda --dtype bfloat16 \
        --num-requests 256 --min-input-len 100 --max-input-len 1024 --min-output-len 100 \
        --max-output-len 1024 --hf-batch-size 128 --eager-too
    python benchmarks/engine_throughput.py --batch1 --device cuda --dtype bfloat16

On CUDA the table adds the decode roofline: for every decode step of the run (all requests
start together), the bytes of the weights plus the K/V of every running sequence, over the HBM
bandwidth measured here with a large device copy; Miles' fraction is that time over its time.
``--eager-too`` also times Miles with ``disable_cuda_graph``, ``--serial-too`` with the serial
(not overlapped) decode schedule. ``--batch1``: decode speed of one
request (128 prompt tokens, 256 generated) for the SmolLM2-135M and Qwen3-0.6B shapes against
``transformers`` batch 1 (results ``engine_decode_batch1``).
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


# SmolLM2-135M's config (a Llama): random weights of its shape for the batch-1 decode figure.
SMOLLM2_135M_SHAPE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "eos_token_id": 2,
}
SHAPES = {"qwen3-0.6b-shape": QWEN3_06B_SHAPE, "smollm2-135m-shape": SMOLLM2_135M_SHAPE}


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
    p.add_argument("--eager-too", action="store_true", help="also time Miles without CUDA graphs")
    p.add_argument(
        "--serial-too", action="store_true", help="also time Miles without the overlapped decode schedule"
    )
    p.add_argument("--batch1", action="store_true", help="batch-1 decode of the 135M and 0.6B shapes")
    p.add_argument(
        "--profile-decode",
        action="store_true",
        help="after the timed run, profile 10 decode steps of --num-requests requests",
    )
    p.add_argument("--no-write", action="store_true", help="print only, write no results JSON")
    args = p.parse_args(argv)
    for what in ("input", "output"):
        lo, hi = getattr(args, f"min_{what}_len"), getattr(args, f"max_{what}_len")
        if not 1 <= lo <= hi:
            p.error(f"--min-{what}-len ({lo}) must be between 1 and --max-{what}-len ({hi})")
    return args


def make_checkpoint(model: str, dtype: str, out: Path) -> Path:
    """An HF directory both sides load, so they run the very same weights."""
    from miles.models.loading import build_model, load_model, save_hf
    from miles.models.spec import ModelSpec

    if model in SHAPES:
        torch.manual_seed(0)
        m = build_model(ModelSpec.from_hf_config(SHAPES[model]), dtype=getattr(torch, dtype))
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
    path: Path, args: argparse.Namespace, prompts: list[list[int]], outs: list[int], **engine_kw: Any
) -> dict[str, Any]:
    """Time one Miles engine (``engine_kw``: extra ``Engine`` arguments, e.g. the serial schedule)."""
    from miles.config import EngineConfig
    from miles.engine.engine import Engine
    from miles.engine.llm import derive_num_blocks
    from miles.models.loading import load_model
    from miles.types import SamplingParams

    model = load_model(path, dtype=args.dtype, device=args.device)
    ctx = args.max_input_len + args.max_output_len + 1
    num_blocks = derive_num_blocks(model, args.block_size, args.num_requests, ctx, 0.85, model.dtype)
    overlap = engine_kw.pop("overlap_schedule", None)
    settings = EngineConfig(
        page_size=args.block_size,
        max_running_requests=max(args.num_requests, 1),
        max_prefill_tokens=args.max_num_batched_tokens,
        random_seed=args.seed,
        **engine_kw,
    )
    engine = Engine(model, None, settings, num_blocks=num_blocks, overlap_schedule=overlap)
    # Warm-up: the whole workload's prefill (the same chunks as the timed run) and a few decode
    # steps, so that every Triton specialisation the run needs is compiled before the clock
    # starts (the first variant timed once paid ~1 s per compilation, the later ones nothing).
    engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    engine.flush_cache()
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in outs]
    sync(args.device)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    sync(args.device)
    elapsed = time.perf_counter() - t0
    tokens = sum(r.completion_tokens for r in results)
    res = {
        "output_tokens": tokens,
        "seconds": elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "num_blocks": num_blocks,
        "num_preemptions": engine.stats().num_preemptions,
        "cuda_graphs": engine.graphs is not None,
        "overlap_schedule": engine.overlap,
    }
    if engine.graphs is not None:
        res["graph_capture_seconds"] = engine.graphs.capture_seconds
        res["graph_sizes_captured"] = len(engine.graphs.captured)
    if args.profile_decode:
        try:
            res["profile"] = profile_decode(engine, args)
        except Exception as e:  # the profile is extra: never lose the measurement to it
            res["profile"] = {"error": f"{type(e).__name__}: {e}"}
    del engine, model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def profile_decode(engine: Any, args: argparse.Namespace, steps: int = 10) -> dict[str, float]:
    """Wall and GPU-busy milliseconds per decode step with ``--num-requests`` requests running
    (prompts of half ``--max-input-len``), and the top kernels: host- or GPU-bound?"""
    from torch.profiler import ProfilerActivity, profile

    from miles.types import SamplingParams

    rng = random.Random(1)
    params = SamplingParams(temperature=1.0, max_new_tokens=steps + 8, ignore_eos=True)
    for _ in range(args.num_requests):
        engine.add_request([rng.randrange(1000) for _ in range(max(1, args.max_input_len // 2))], params)
    while any(r.num_computed_tokens < len(r.prompt_ids) for r in engine._requests.values()):
        engine.step()
    engine.step()  # the first decode step of this batch size may capture its graph
    sync(args.device)
    t0 = time.perf_counter()
    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
        sync(args.device)
    wall = (time.perf_counter() - t0) / steps * 1e3
    events = prof.key_averages()
    gpu = sum(getattr(e, "self_device_time_total", 0) for e in events) / steps / 1e3
    print(f"decode step with {args.num_requests} requests: wall {wall:.2f} ms, GPU busy {gpu:.2f} ms")
    if cuda:
        print(
            events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50), flush=True
        )
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50), flush=True)
    while engine.has_unfinished():
        engine.step()
    return {"requests": args.num_requests, "wall_ms_per_step": wall, "gpu_busy_ms_per_step": gpu}


def hbm_bandwidth(device: str) -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write), best of 5."""
    src = torch.empty(1 << 30, dtype=torch.uint16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * (2 << 30) / best


def decode_roofline_seconds(
    path: Path, dtype: str, prompts: list[list[int]], outs: list[int], bw: float
) -> float:
    """Lower bound of the decode time: every step reads all weights once plus the K/V of every
    running sequence (all requests start together; a request decodes ``outs[i] - 1`` steps
    after its prefill samples the first token)."""
    from miles.models.loading import load_config

    spec = load_config(path)
    elem = torch.finfo(getattr(torch, dtype)).bits // 8
    h, inter, layers = spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers
    attn = h * spec.head_dim * (spec.num_attention_heads * 2 + spec.num_key_value_heads * 2)
    weights = elem * (layers * (attn + 3 * h * inter + 2 * h) + spec.vocab_size * h + h)
    kv_per_token = elem * layers * 2 * spec.num_key_value_heads * spec.head_dim
    total = 0.0
    for t in range(1, max(outs)):
        kv = sum(len(p) + t for p, n in zip(prompts, outs) if n > t)
        total += (weights + kv * kv_per_token) / bw
    return total


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

    def run_all(bs: int) -> int | None:
        """Tokens generated with static batches of ``bs``; ``None`` if the GPU ran out of memory."""
        generated = 0
        try:
            for i in range(0, len(prompts), bs):
                n = max(outs[i : i + bs])
                batch_generate(prompts[i : i + bs], n)
                generated += n * len(prompts[i : i + bs])
        except torch.OutOfMemoryError:
            return None
        return generated

    batch_generate([prompts[0][:8]], 4)  # warm-up
    bs = args.hf_batch_size
    while True:
        sync(args.device)
        t0 = time.perf_counter()
        result = run_all(bs)
        sync(args.device)
        if result is not None or bs == 1:
            break
        torch.cuda.empty_cache()  # outside the handler: the failed batch's frames are gone
        bs //= 2
        print(f"transformers ran out of memory: static batches of {bs}", flush=True)
    generated = result or 0
    elapsed = time.perf_counter() - t0
    tokens = sum(outs)
    return {
        "name": "transformers generate",
        "batch_size": bs,
        "output_tokens": tokens,
        "generated_tokens_incl_padding": generated,
        "seconds": elapsed,
        "output_tokens_per_s": tokens / elapsed,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from miles.models.loading import load_config

    if args.batch1:
        return batch1(args)
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(args.model, args.dtype, Path(tmp))
        prompts, outs = make_workload(args, load_config(path).vocab_size)
        try:
            miles = run_miles(path, args, prompts, outs)
        except Exception as e:  # a broken fast path must not cost the run its other figures
            import os
            import traceback

            from miles.kernels.triton_loader import triton_module

            traceback.print_exc()
            os.environ["MILES_FUSED_KERNELS"] = "torch"  # retry without the fused kernels
            triton_module.cache_clear()
            miles = run_miles(path, args, prompts, outs)
            miles["fused_kernels_error"] = f"{type(e).__name__}: {e}"
        print(f"miles: {miles}", flush=True)
        if args.eager_too and cuda and miles["cuda_graphs"]:
            miles["eager"] = run_miles(path, args, prompts, outs, disable_cuda_graph=True)
            print(f"miles eager: {miles['eager']}", flush=True)
        if args.serial_too and miles["overlap_schedule"]:
            miles["serial"] = run_miles(path, args, prompts, outs, overlap_schedule=False)
            print(f"miles serial: {miles['serial']}", flush=True)
        if cuda:
            bw = hbm_bandwidth(args.device)
            roof = decode_roofline_seconds(path, args.dtype, prompts, outs, bw)
            miles["hbm_bytes_per_s"] = bw
            miles["decode_roofline_seconds"] = roof
            miles["roofline_fraction"] = roof / miles["seconds"]
        base = None if args.skip_baseline else run_transformers(path, args, prompts, outs)
    rows = [["miles engine", miles["output_tokens"], miles["seconds"], miles["output_tokens_per_s"]]]
    if "eager" in miles:
        e = miles["eager"]
        rows.append(["miles, no CUDA graphs", e["output_tokens"], e["seconds"], e["output_tokens_per_s"]])
    if "serial" in miles:
        e = miles["serial"]
        rows.append(["miles, serial schedule", e["output_tokens"], e["seconds"], e["output_tokens_per_s"]])
    if cuda:
        rows.append(["decode roofline", miles["output_tokens"], miles["decode_roofline_seconds"],
                     miles["output_tokens"] / miles["decode_roofline_seconds"]])  # fmt: skip
    if base is not None:
        rows.append([base["name"], base["output_tokens"], base["seconds"], base["output_tokens_per_s"]])
    device = device_string(args.device)
    print(f"engine_throughput on {device}: {args.model}, {args.num_requests} requests, {args.dtype}")
    print_table(["system", "output tokens", "seconds", "output tok/s"], rows)
    if base is None:
        return
    ratio = miles["output_tokens_per_s"] / base["output_tokens_per_s"]
    print(f"ratio (miles / transformers): {ratio:.2f}x")
    if cuda:
        print(
            f"HBM {miles['hbm_bytes_per_s'] / 1e12:.2f} TB/s; Miles at {miles['roofline_fraction']:.0%} of the decode roofline"
        )
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


def batch1(args: argparse.Namespace) -> None:
    """Batch-1 decode tok/s of the 135M and 0.6B shapes: Miles against ``transformers``."""
    results: dict[str, Any] = {}
    base: dict[str, Any] = {}
    rows = []
    for shape in ("smollm2-135m-shape", "qwen3-0.6b-shape"):
        args.model = shape
        with tempfile.TemporaryDirectory() as tmp:
            path = make_checkpoint(shape, args.dtype, Path(tmp))
            rng = random.Random(args.seed)
            prompt = [[rng.randrange(1000) for _ in range(128)]]
            args.num_requests, args.max_input_len, args.max_output_len = 1, 128, 256
            m = run_miles(path, args, prompt, [256])
            b = run_transformers(path, args, prompt, [256])
        results[shape] = m["output_tokens_per_s"]
        base[shape] = b["output_tokens_per_s"]
        rows.append(
            [
                shape,
                m["output_tokens_per_s"],
                b["output_tokens_per_s"],
                m["output_tokens_per_s"] / b["output_tokens_per_s"],
            ]
        )
    device = device_string(args.device)
    print(f"engine_decode_batch1 on {device}, {args.dtype}: 128 prompt tokens, 256 generated")
    print_table(["model", "miles tok/s", "transformers tok/s", "ratio"], rows)
    if not args.no_write:
        results["qwen3_0_6b_tokens_per_s"] = results["qwen3-0.6b-shape"]
        base["qwen3_0_6b_tokens_per_s"] = base["qwen3-0.6b-shape"]
        path_out = write_results("engine_decode_batch1", device, {"dtype": args.dtype, "prompt": 128, "output": 256},
                                 results, base, "qwen3_0_6b_tokens_per_s", packages=("transformers",))  # fmt: skip
        print(f"wrote {path_out}")


if __name__ == "__main__":
    main()

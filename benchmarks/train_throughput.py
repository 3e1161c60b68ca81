"""Trainer throughput: tokens/s and MFU of a Miles training step vs a plain transformers step.

Both sides train the same random-weight model (same config, same initial weights, same tokens,
AdamW) for a few warm-up steps, then a few timed steps:

- Miles: ``Trainer.train_step`` with the SFT loss, packed sequences, micro-batches of
  ``--tokens-per-micro-batch`` tokens (``max_tokens_per_gpu``), chunked LM head;
- baseline: ``transformers.AutoModelForCausalLM`` with the same config, the same sequences as
  ``[n, seq_len]`` batches (equal lengths: no padding waste), ``labels=`` loss, ``backward``,
  ``torch.optim.AdamW`` step.

MFU = 6 x (active) parameters x tokens / step time / peak, where the peak is measured in the
same run with a large ``torch.matmul`` in the training dtype. Prints a table and writes
``benchmarks/results/train_throughput-<device-slug>-<date>.json`` (DESIGN.md §11).

    python benchmarks/train_throughput.py --model tiny --tokens-per-micro-batch 1024
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import device_string, write_results  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "qwen3-0.6b-shape": dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen3-moe-small": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
}
COMMON = dict(max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Any, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--tokens-per-micro-batch", type=int, default=1024)
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--seq-len", type=int, default=256, help="length of each packed sequence")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--peak-matmul-n", type=int, default=None)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--profile", action="store_true", help="print the top ops of one Miles step")
    ap.add_argument(
        "--eager-too",
        action="store_true",
        help="also time Miles with MILES_COMPILE=0 (its elementwise ops not compiled), same run",
    )
    args = ap.parse_args()

    import transformers

    from miles.config import AlgoConfig, TrainConfig
    from miles.models import ModelSpec
    from miles.models.loading import build_model, save_hf
    from miles.train.flops import active_params, matmul_peak_flops
    from miles.train.trainer import Trainer
    from miles.types import TrainBatch

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.tokens_per_micro_batch % args.seq_len:
        ap.error("--tokens-per-micro-batch must be a multiple of --seq-len")
    hf_cfg = {**COMMON, **MODELS[args.model]}
    torch.manual_seed(0)

    # Same tokens for both: micro-batches of n_seq sequences of seq_len tokens.
    n_seq = args.tokens_per_micro_batch // args.seq_len
    total_seqs = n_seq * args.micro_batches
    tokens = total_seqs * args.seq_len
    ids = torch.randint(0, hf_cfg["vocab_size"], (total_seqs, args.seq_len))
    cu = torch.arange(0, tokens + 1, args.seq_len, dtype=torch.int32)
    positions = torch.arange(args.seq_len).repeat(total_seqs)
    mask = (positions > 0).float()
    batch = TrainBatch(
        input_ids=ids.flatten(),
        positions=positions,
        cu_seqlens=cu,
        loss_mask=mask,
        rollout_logprobs=torch.zeros(tokens),
        advantages=torch.zeros(tokens),
        rewards=torch.zeros(total_seqs),
        response_lens=torch.full((total_seqs,), args.seq_len - 1),
        sample_indices=tuple(range(total_seqs)),
    )

    spec = ModelSpec.from_hf_config(hf_cfg)
    model = build_model(spec, dtype=dtype, device=device)
    # The baseline starts from the same weights through an HF export (transformers renames MoE
    # experts on load, so a plain load_state_dict would not do).
    hf_dir = Path(tempfile.mkdtemp(prefix="miles-bench-"))
    save_hf(model, hf_dir / "model", dtype=dtype)
    n_active = active_params(model)
    cfg = TrainConfig(
        lr=1e-5,
        loss_type="sft_loss",
        use_dynamic_batch_size=True,
        max_tokens_per_gpu=args.tokens_per_micro_batch,
        weight_decay=0.0,
        calculate_per_token_loss=True,
    )
    trainer = Trainer(model, cfg, AlgoConfig(), device)

    def miles_step() -> None:
        trainer.train_step(batch)

    miles_s = _timed(miles_step, args.warmup, args.steps, device)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        start = time.perf_counter()
        with profile(activities=acts) as prof:
            miles_step()
            _sync(device)
        wall = time.perf_counter() - start
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        print(averages.table(sort_by=key, row_limit=40, max_name_column_width=70), flush=True)
        if device.type == "cuda":
            # Kernel time summed over kernels against the profiled step's wall time: far below it,
            # the step waits on the host (launches, Python), not on the GPU.
            # (Only the kernels' own rows: an aten op's row repeats its kernels' time.)
            kernels = [e for e in averages if str(getattr(e, "device_type", "")).endswith("CUDA")]
            busy = sum(getattr(e, "self_device_time_total", 0.0) for e in kernels) / 1e6
            print(f"profiled step: {wall:.3f} s wall, GPU kernels {busy:.3f} s ({100 * busy / wall:.0f}%)")
    eager_s = None
    if args.eager_too:
        import os

        os.environ["MILES_COMPILE"] = "0"
        eager_s = _timed(miles_step, args.warmup, args.steps, device)
        del os.environ["MILES_COMPILE"]
    trainer.model = trainer.optimizer = None  # type: ignore[assignment]  # free before the baseline
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir / "model", dtype=dtype, attn_implementation="sdpa"
    )
    shutil.rmtree(hf_dir)
    hf.to(device).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=device.type == "cuda" or None)
    chunks = ids.to(device).split(n_seq)

    def hf_step() -> None:
        for chunk in chunks:
            # Sum over micro-batches of mean losses / count: the mean over the step's tokens.
            (hf(input_ids=chunk, labels=chunk).loss / len(chunks)).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    base_s = _timed(hf_step, args.warmup, args.steps, device)

    n = args.peak_matmul_n or (8192 if device.type == "cuda" else 2048)
    peak = matmul_peak_flops(device, dtype, n)
    flops = 6 * n_active * tokens
    from miles.kernels import compiled

    miles: dict[str, Any] = {
        "tokens_per_s": tokens / miles_s,
        "step_time_s": miles_s,
        "mfu": flops / miles_s / peak,
        "compiled_elementwise": device.type == "cuda" and not compiled._failed,
    }
    if compiled._failed:
        miles["compile_error"] = compiled._failed[0]
    if eager_s is not None:
        miles["eager_elementwise"] = {
            "tokens_per_s": tokens / eager_s,
            "step_time_s": eager_s,
            "mfu": flops / eager_s / peak,
        }
    base = {
        "name": "transformers AutoModelForCausalLM + AdamW",
        "tokens_per_s": tokens / base_s,
        "step_time_s": base_s,
        "mfu": flops / base_s / peak,
    }
    device_name = device_string(str(device))
    config = {
        "model": args.model,
        "hf_config": hf_cfg,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_micro_batch": args.tokens_per_micro_batch,
        "micro_batches": args.micro_batches,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens,
        "warmup": args.warmup,
        "steps": args.steps,
        "active_params": n_active,
        "peak_matmul_n": n,
        "peak_flops_measured": peak,
    }
    print(
        f"\n{args.model}, {tokens} tokens/step, {dtype}, {device_name}; matmul peak {peak / 1e12:.3f} TFLOP/s"
    )
    print(f"{'':<14}{'tokens/s':>12}{'step s':>10}{'MFU':>8}")
    rows = [("miles", miles)] + ([("miles, eager", miles["eager_elementwise"])] if eager_s else [])
    for name, r in (*rows, ("transformers", base)):
        print(f"{name:<14}{r['tokens_per_s']:>12.1f}{r['step_time_s']:>10.3f}{r['mfu']:>8.1%}")
    print(f"ratio (miles / transformers tokens/s): {miles['tokens_per_s'] / base['tokens_per_s']:.3f}")
    path = write_results("train_throughput", device_name, config, miles, base, "tokens_per_s",
                         packages=("transformers",), out_dir=Path(args.out_dir))  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Tile configurations of the batch-invariant Triton matmul on one GPU, in one run.

For each candidate configuration: correctness against ``F.linear``, TFLOP/s on an ``n^3`` GEMM
against cuBLAS, and for the fastest ones batch invariance (every row of ``x[:m] @ w.T`` equals the
same row of ``x[:512] @ w.T``, bitwise, for m in 1..512). Also times the shapes of a
Qwen3-0.6B layer at decode and prefill sizes. The chosen one goes into
``miles.kernels.triton.matmul.CONFIGS`` by hand.

    python benchmarks/invariant_matmul_tune.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

from miles.kernels.triton.matmul import TileConfig, matmul

CANDIDATES = [
    TileConfig(128, 256, 64, 8, 8, 3, True),
    TileConfig(128, 256, 64, 8, 8, 4, True),
    TileConfig(128, 128, 64, 8, 8, 4, True),
    TileConfig(128, 128, 64, 8, 4, 4, True),
    TileConfig(128, 256, 64, 8, 8, 3, False),
    TileConfig(128, 256, 64, 8, 8, 4, False),
    TileConfig(128, 128, 64, 8, 8, 4, False),
    TileConfig(128, 128, 64, 8, 4, 4, False),
]
M_VALUES = [1, 2, 7, 16, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300, 511, 512]


def bench(fn, reps: int = 30) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / reps)
    return best


def invariant(cfg: TileConfig, dtype: torch.dtype, n: int = 1536, k: int = 1024) -> list[int]:
    """The m values for which some row of the m-row product differs from the 512-row one."""
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g)
    x = torch.randn(512, k, device="cuda", dtype=dtype, generator=g)
    full = matmul(x, w, config=cfg)
    return [m for m in M_VALUES if not torch.equal(matmul(x[:m], w, config=cfg), full[:m])]


def launch_costs() -> dict[str, float]:
    """Host time per call (us) of a decode-sized GEMM, queued without waiting for the GPU."""
    from miles.kernels import batch_invariant as bi

    a = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3072, 1024, device="cuda", dtype=torch.bfloat16)
    ptr = TileConfig(128, 256, 64, 8, 8, 3, False)
    fns = {"F.linear": lambda: F.linear(a, b), "matmul_tma": lambda: matmul(a, b),
           "matmul_ptr": lambda: matmul(a, b, config=ptr), "bi.linear": lambda: bi.linear(a, b),
           "tensor_descriptor_x3": lambda: [tm_desc(a, [128, 64]) for _ in range(3)]}  # fmt: skip

    def tm_desc(t, block):  # type: ignore[no-untyped-def]
        from triton.tools.tensor_descriptor import TensorDescriptor

        return TensorDescriptor.from_tensor(t, block)

    out = {}
    for name, fn in fns.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        out[name] = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="only the default configuration and launch costs")
    args = p.parse_args()
    n, dtype = args.n, torch.bfloat16
    x = torch.randn(n, n, device="cuda", dtype=dtype)
    w = torch.randn(n, n, device="cuda", dtype=dtype)
    flops = 2 * n**3
    cublas = flops / bench(lambda: F.linear(x, w)) / 1e12
    ref = F.linear(x, w).float()
    rows = []
    for cfg in [] if args.quick else CANDIDATES:
        t0 = time.perf_counter()
        try:
            y = matmul(x, w, config=cfg)
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            tflops = flops / bench(lambda cfg=cfg: matmul(x, w, config=cfg)) / 1e12
        except Exception as e:  # a config that does not compile is reported, not fatal
            rows.append({"config": asdict(cfg), "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(cfg, "FAILED", rows[-1]["error"], flush=True)
            continue
        rows.append({"config": asdict(cfg), "tflops": tflops, "fraction": tflops / cublas, "rel_err": err,
                     "compile_and_bench_s": time.perf_counter() - t0})  # fmt: skip
        print(
            f"{cfg}: {tflops:.0f} TFLOP/s = {tflops / cublas:.0%} of cuBLAS {cublas:.0f}, err {err:.2e}",
            flush=True,
        )
    ok = sorted((r for r in rows if "tflops" in r), key=lambda r: -r["tflops"])
    for r in ok[:4]:
        cfg = TileConfig(**r["config"])
        r["non_invariant_m"] = invariant(cfg, dtype)
        r["non_invariant_m_fp16"] = invariant(cfg, torch.float16)
        print(cfg, "non-invariant m:", r["non_invariant_m"], r["non_invariant_m_fp16"], flush=True)
    # Qwen3-0.6B layer shapes (hidden 1024, q 2048, kv 1024, mlp 3072) with the default config
    shapes = {}
    for m in (16, 256, 2048):
        for name, (nn_, kk) in {"qkv": (4096, 1024), "o": (1024, 2048), "up": (3072, 1024), "down": (1024, 3072),
                                "lm_head": (151936, 1024)}.items():  # fmt: skip
            a = torch.randn(m, kk, device="cuda", dtype=dtype)
            b = torch.randn(nn_, kk, device="cuda", dtype=dtype)
            tc = bench(lambda a=a, b=b: F.linear(a, b), 10)
            tt = bench(lambda a=a, b=b: matmul(a, b), 10)
            shapes[f"{name}_m{m}"] = {"cublas_us": tc * 1e6, "triton_us": tt * 1e6}
    print(json.dumps(shapes, indent=1), flush=True)
    launch = launch_costs()
    print(json.dumps(launch, indent=1), flush=True)
    result = {
        "launch_us": launch,
        "device": torch.cuda.get_device_name(),
        "n": n,
        "cublas_tflops": cublas,
        "configs": rows,
        "shapes": shapes,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

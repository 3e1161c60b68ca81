"""Shared benchmark helpers: device description, versions, the results JSON (DESIGN.md §11), tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def device_string(device: str = "cpu") -> str:
    """``"NVIDIA H100 80GB HBM3"`` on CUDA, ``"cpu: <model>, N cores"`` otherwise."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {model}, {cores} cores"


def device_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:60]


def git_sha() -> str:
    """Short sha of HEAD, with ``-dirty`` when the work tree has changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
        ).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"miles": git_sha(), "python": platform.python_version()}
    for pkg in ("torch", *packages):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def write_results(
    benchmark: str,
    device: str,
    config: Mapping[str, Any],
    miles: Mapping[str, Any],
    baseline: Mapping[str, Any],
    headline_metric: str,
    packages: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    out_dir: Path = RESULTS_DIR,
) -> Path:
    """Write ``<benchmark>-<device-slug>-<date>.json`` and return its path.

    ``ratio`` is Miles over the baseline on ``headline_metric`` (> 1: Miles is better; for a
    metric where lower is better, pass its inverse as the headline).
    """
    date = datetime.date.today().isoformat()
    record = {
        "benchmark": benchmark,
        "device": device,
        "date": date,
        "versions": versions(*packages),
        "config": dict(config),
        "miles": dict(miles),
        "baseline": dict(baseline),
        "ratio": miles[headline_metric] / baseline[headline_metric],
        "headline_metric": headline_metric,
        **(extra or {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{benchmark}-{device_slug(device)}-{date}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned text table (floats with 2 decimals)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))

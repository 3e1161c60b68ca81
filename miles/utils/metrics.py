"""Metric sinks: ``metrics.jsonl`` in the run directory, a one-line console summary per step, and
TensorBoard / Weights & Biases when asked for (both imported lazily, only then)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

# The keys of the one-line console summary, in order, with their short labels.
_SUMMARY = [
    ("rollout/raw_reward", "reward"),
    ("eval/", "eval"),
    ("rollout/response_len/mean", "len"),
    ("train/loss", "loss"),
    ("train/pg_clipfrac", "clip"),
    ("train/ppo_kl", "kl"),
    ("train/train_rollout_logprob_abs_diff", "|dlogp|"),
    ("perf/step_time", "s"),
]


class MetricsLogger:
    """Writes each step's metrics to every configured sink. ``close`` flushes them."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        use_tensorboard: bool = False,
        use_wandb: bool = False,
        wandb_project: str | None = None,
        wandb_mode: str | None = None,
        wandb_group: str | None = None,
        config: dict[str, Any] | None = None,
        stream: TextIO | None = None,
        console_interval: int = 1,
    ) -> None:
        """``console_interval``: print the summary line every N steps (the files get every step)."""
        if console_interval < 1:
            raise ValueError(f"console_interval must be >= 1, got {console_interval}")
        self.console_interval = console_interval
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
        self._stream = stream if stream is not None else sys.stderr
        self._tb: Any = None
        self._wandb: Any = None
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if use_wandb:
            import wandb

            mode: Any = wandb_mode or "online"
            if mode not in ("online", "offline", "disabled", "shared"):
                raise ValueError(f"--wandb-mode must be online, offline, disabled or shared, got {mode!r}")

            self._wandb = wandb.init(
                project=wandb_project or "miles",
                dir=str(self.run_dir),
                mode=mode,
                group=wandb_group,
                config=config,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if step % self.console_interval == 0:
            print(f"step {step}: {summary_line(clean)}", file=self._stream, flush=True)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def summary_line(metrics: dict[str, float]) -> str:
    parts = []
    for key, label in _SUMMARY:
        if key.endswith("/"):
            parts += [
                f"{k[len(key) :]}={v:.3f}"
                for k, v in metrics.items()
                if k.startswith(key) and k.count("/") == 1
            ]
        elif key in metrics:
            parts.append(f"{label}={metrics[key]:.4g}")
    return " ".join(parts)


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Every record of ``run_dir/metrics.jsonl`` (a resumed run appends to the same file)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

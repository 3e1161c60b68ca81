"""``miles plot RUN_DIR``: the run's curves from ``metrics.jsonl`` to PNG files (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from miles.utils.metrics import read_metrics

# figure name -> (title, metric-key predicate as (prefix, exact keys))
FIGURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "reward": ("Reward (train) and accuracy (eval)", ("rollout/raw_reward", "eval/*")),
    "response_len": ("Response length", ("rollout/response_len/mean", "rollout/response_len/max")),
    "kl": ("KL", ("train/ppo_kl", "train/kl_loss", "train/mismatch_k3_kl")),
    "entropy": ("Entropy", ("train/entropy",)),
    "clipfrac": ("Clip fraction", ("train/pg_clipfrac",)),
    "logprob_mismatch": ("|trainer - rollout| log-prob", ("train/train_rollout_logprob_abs_diff",)),
    "step_time": (
        "Step time breakdown (s)",
        ("perf/rollout_time", "perf/train_time", "perf/update_weights_time"),
    ),
    "loss": ("Loss", ("train/loss",)),
    # Asynchronous runs: how old the trained tokens are, and who waits for whom.
    "staleness": ("Staleness of trained tokens (versions)", ("async/staleness/mean", "async/staleness/max")),
    "idle": ("Idle fraction of the step", ("perf/trainer_idle_frac", "perf/engine_idle_frac")),
    # MoE: averages over layers, then per layer (train/expert_load_*/layer_{i})
    "expert_load": (
        "Expert load (max/mean, CV)",
        (
            "train/expert_load_max_over_mean",
            "train/expert_load_cv",
            "train/expert_load_max_over_mean/*",
            "train/expert_load_cv/*",
        ),
    ),
}


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows if key in r]
    # a resumed run appends: the last value logged for a step wins
    merged = dict(points)
    steps = sorted(merged)
    return steps, [merged[s] for s in steps]


def _keys(rows: list[dict], patterns: tuple[str, ...]) -> list[str]:
    present = sorted({k for r in rows for k in r})
    out = []
    for pattern in patterns:
        if pattern.endswith("/*"):
            stem = pattern[:-1]
            out += [k for k in present if k.startswith(stem) and "/" not in k[len(stem) :]]
        elif pattern in present:
            out.append(pattern)
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per figure that has data; returns the files written.

    Raises ``FileNotFoundError`` naming the missing ``metrics.jsonl``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run / 'metrics.jsonl'} not found: is {run} a `miles train` run directory?")
    rows = read_metrics(run)
    out = Path(out_dir) if out_dir is not None else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, patterns) in FIGURES.items():
        keys = _keys(rows, patterns)
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            steps, values = _series(rows, key)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written

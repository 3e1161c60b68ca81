"""``miles train`` on the tiny MoE arith world with router losses: the losses and the per-layer
expert-load metrics are logged every step, and ``miles plot`` draws ``expert_load.png``."""

from __future__ import annotations

from pathlib import Path

from miles.cli import main
from miles.utils.metrics import read_metrics
from tests.orchestrate.helpers import train_argv


def test_router_losses_and_load_metrics_are_logged_and_plotted(arith_world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = train_argv(arith_world, run_dir, "--num-rollout", "2", "--global-batch-size", "8",
                 "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001")  # fmt: skip
    assert main(argv) == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["train/moe_aux_loss"] > 0 and r["train/moe_z_loss"] > 0
        assert r["train/expert_load_max_over_mean"] >= 1.0 and r["train/expert_load_cv"] >= 0.0
        per_layer = [k for k in r if k.startswith("train/expert_load_cv/layer_")]
        assert sorted(per_layer) == ["train/expert_load_cv/layer_0", "train/expert_load_cv/layer_1"]
        assert {
            "train/expert_load_max_over_mean/layer_0",
            "train/expert_load_max_over_mean/layer_1",
        } <= r.keys()
    capsys.readouterr()
    assert main(["plot", str(run_dir)]) == 0
    written = capsys.readouterr().out.split()
    plot = [Path(p) for p in written if p.endswith("/expert_load.png")]
    assert len(plot) == 1 and plot[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

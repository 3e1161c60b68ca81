"""The MoE RL recipe (``recipes/qwen3_moe_grpo_r3.yaml``) with and without rollout routing replay.

Runs go through ``benchmarks/moe_routing_replay.py``'s harness: the embedded loop, the engine always
recording experts, the trainer replaying them only in the R3 run. On the CPU engine and trainer are
both fp32 and never disagree on a router decision, so the engine's router weights (only those) are
rounded to bf16, as a bf16 engine's are: the engine then picks other experts for ~0.5% of the
(token, layer) pairs, the mismatch R3 exists to remove, and every other difference stays at fp32
noise, so what replay removes is visible.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from miles.config import parse_train_args

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
LOGGED = ("train/train_rollout_logprob_abs_diff", "train/mismatch_k3_kl", "train/routing_mismatch_frac")


def _bench():
    spec = importlib.util.spec_from_file_location(
        "moe_routing_replay", REPO / "benchmarks" / "moe_routing_replay.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Rows of three runs of the recipe on the same seed and data (GRPO without R3, with R3, GSPO
    with R3), the benchmark module and the world."""
    bench = _bench()
    tmp = tmp_path_factory.mktemp("moe_recipe")
    world = bench.make_tiny_world(tmp / "world")

    def argv(name, *extra):
        return ["--config", str(REPO / "recipes" / "qwen3_moe_grpo_r3.yaml"), "--hf-checkpoint", str(world / "model"),
                "--prompt-data", str(world / "train.jsonl"), "--num-rollout", str(STEPS), "--run-dir", str(tmp / name),
                *extra]  # fmt: skip

    round_ = "router-bf16"
    return {
        "bench": bench,
        "world": world,
        "off": bench.run_one(argv("off"), replay=False, engine_round=round_),
        "r3": bench.run_one(argv("r3"), replay=True, engine_round=round_),
        "gspo": bench.run_one(
            argv("gspo", "--advantage-estimator", "gspo"), replay=True, engine_round=round_
        ),
    }


def test_recipe_is_the_tiny_r3_grpo_config():
    config = parse_train_args(["--config", str(REPO / "recipes" / "qwen3_moe_grpo_r3.yaml")])
    assert config.use_rollout_routing_replay and config.algo.advantage_estimator == "grpo"
    assert config.rollout.rm_type == "starts_with_digit" and config.rollout.custom_rm_path is None


def test_both_runs_log_the_mismatch_metrics_every_step(runs):
    for name in ("off", "r3"):
        rows = runs[name]
        assert [r["step"] for r in rows] == list(range(STEPS)), name
        for r in rows:
            for key in LOGGED:
                assert key in r and math.isfinite(r[key]) and r[key] >= 0.0, (name, key)


def test_r3_trains_on_the_engines_experts(runs):
    off, r3 = runs["off"], runs["r3"]
    # The bf16 router of the engine disagrees with the trainer's somewhere...
    assert off[0]["train/routing_mismatch_frac"] > 0.0
    for r in off:  # ...and without replay the trainer uses its router's own choice, mismatches included
        assert r["train/router_mismatch_frac"] == r["train/routing_mismatch_frac"]
    for r in r3:  # with R3 every forward used exactly the engine's experts
        assert r["train/routing_mismatch_frac"] == 0.0
        assert 0.0 <= r["train/router_mismatch_frac"] <= 1.0  # the router's own disagreement, before replay
    assert any(r["train/router_mismatch_frac"] > 0 for r in r3)  # replay did override something


def test_r3_lowers_the_mismatch_kl(runs):
    off, r3 = runs["off"], runs["r3"]
    # Step 0: the same weights generated the same samples in both runs; only the replay differs.
    assert off[0]["rollout/raw_reward"] == r3[0]["rollout/raw_reward"]
    assert off[0]["rollout/response_len/mean"] == r3[0]["rollout/response_len/mean"]
    # Only the routers differ between engine and trainer, so replay leaves fp32 noise (~1e-13)
    # where the flipped experts left ~1e-9 and more.
    assert r3[0]["train/mismatch_k3_kl"] < off[0]["train/mismatch_k3_kl"] / 10
    assert r3[0]["train/train_rollout_logprob_abs_diff"] < off[0]["train/train_rollout_logprob_abs_diff"]
    mean = lambda rows: sum(r["train/mismatch_k3_kl"] for r in rows) / len(rows)  # noqa: E731
    assert mean(r3) < mean(off) / 10


def test_gspo_runs_the_recipe_with_r3(runs):
    rows = runs["gspo"]
    assert [r["step"] for r in rows] == list(range(STEPS))
    for r in rows:
        assert r["train/routing_mismatch_frac"] == 0.0
        assert math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 and r["train/skipped_steps"] == 0
        for key in LOGGED:
            assert key in r, key


def test_the_run_without_replay_is_a_plain_run_without_r3(runs, tmp_path):
    """The harness's baseline (engine recording, trainer not replaying) trains exactly as
    ``miles train --no-use-rollout-routing-replay``: the records only feed the mismatch metric."""
    from miles.cli import main
    from miles.utils.metrics import read_metrics

    world = runs["world"]
    base = ["--config", str(REPO / "recipes" / "qwen3_moe_grpo_r3.yaml"), "--hf-checkpoint", str(world / "model"),
            "--prompt-data", str(world / "train.jsonl"), "--num-rollout", "2"]  # fmt: skip
    assert (
        main(["train", *base, "--no-use-rollout-routing-replay", "--run-dir", str(tmp_path / "plain")]) == 0
    )
    harness = runs["bench"].run_one([*base, "--run-dir", str(tmp_path / "harness")], replay=False)
    plain = read_metrics(tmp_path / "plain")
    assert len(plain) == len(harness) == 2
    for p, h in zip(plain, harness, strict=True):
        assert "train/routing_mismatch_frac" not in p and "train/routing_mismatch_frac" in h
        same = {k for k in p if not k.startswith("perf/") and k != "time"}
        assert {k: p[k] for k in same} == {k: h[k] for k in same}

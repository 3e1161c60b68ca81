"""``miles train --advantage-estimator ppo`` end to end: critic values, GAE, critic-only steps, resume."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from miles.cli import main
from miles.models.loading import load_model
from miles.orchestrate.local import LocalPlacement
from miles.rollout.dump import load_rollout_dump
from miles.utils.metrics import read_metrics

CRITIC_KEYS = ("train/critic-value_loss", "train/critic-value_clipfrac", "train/critic-grad_norm",
               "train/critic-lr", "rollout/values", "rollout/returns", "rollout/advantages")  # fmt: skip


async def digit_first_rm(args, sample) -> float:
    """A reward with spread from the first step: 1 when the response starts with a digit."""
    return float(sample.response[:1].isdigit())


def _argv(world, run_dir, *extra):
    return ["train", "--hf-checkpoint", str(world / "model"), "--prompt-data", str(world / "train.jsonl"),
            "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
            "--custom-rm-path", f"{__name__}.digit_first_rm", "--rollout-batch-size", "4",
            "--n-samples-per-prompt", "4", "--rollout-max-response-len", "4", "--lr", "1e-3",
            "--advantage-estimator", "ppo", "--critic-load", str(world / "model"), "--run-dir", str(run_dir),
            "--use-dynamic-batch-size", "--max-tokens-per-gpu", "1024", *extra]  # fmt: skip


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_trains_critic_then_policy(arith_world, tmp_path, monkeypatch):
    pushed = []  # (version, policy params, critic params) at each weight push
    push = LocalPlacement.push_weights

    def spy(self, version):
        assert self.trainer.critic is not None
        pushed.append((version, _params(self.trainer.model), _params(self.trainer.critic.model)))
        return push(self, version)

    monkeypatch.setattr(LocalPlacement, "push_weights", spy)
    run_dir = tmp_path / "run"
    # 2 optimizer steps per rollout: the critic-only rollout step covers both of them.
    argv = _argv(arith_world, run_dir, "--num-rollout", "3", "--global-batch-size", "8",
                 "--num-critic-only-steps", "1", "--kl-coef", "0.01")  # fmt: skip
    assert main(argv) == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        for key in CRITIC_KEYS:
            assert key in r and math.isfinite(r[key]), key  # the logger drops non-finite values
        assert r["train/critic-grad_norm"] > 0 and r["train/critic-lr"] == 1e-3
    assert rows[0]["train/critic_only"] == 1 and "train/pg_loss" not in rows[0]
    # the engine/trainer mismatch is measured on every step, warm-up included
    assert all(r["train/train_rollout_logprob_abs_diff"] >= 0 for r in rows)
    assert all(r["train/critic_only"] == 0 and "train/pg_loss" in r for r in rows[1:])
    assert rows[0]["rollout/values"] == 0.0  # the zero-initialised value head
    assert rows[1]["rollout/values"] != 0.0  # the critic learned on step 0

    initial_policy = _params(load_model(arith_world / "model"))
    assert [v for v, _, _ in pushed] == [1, 2, 3]
    _, policy_1, critic_1 = pushed[0]
    assert _same(policy_1, initial_policy)  # the critic-only step left the policy alone...
    backbone_1 = {k.removeprefix("backbone."): v for k, v in critic_1.items() if k.startswith("backbone.")}
    assert backbone_1.keys() <= initial_policy.keys()  # --critic-load is the policy's checkpoint
    assert not _same(backbone_1, {k: initial_policy[k] for k in backbone_1})
    assert torch.count_nonzero(critic_1["value_head.weight"]) > 0  # ...while the critic moved
    assert not _same(pushed[1][1], initial_policy)  # step 1 trained the policy


def test_value_loss_falls_on_a_fixed_batch(arith_world, tmp_path):
    dump = tmp_path / "dump"
    argv = _argv(arith_world, tmp_path / "gen", "--num-rollout", "1", "--debug-rollout-only",
                 "--save-debug-rollout-data", str(dump))  # fmt: skip
    assert main(argv) == 0
    for step in range(1, 6):
        shutil.copy(dump / "rollout_0.pt", dump / f"rollout_{step}.pt")
    rewards = torch.tensor([s.reward for g in load_rollout_dump(dump / "rollout_0.pt") for s in g.samples])
    assert 0 < rewards.mean() < 1
    run_dir = tmp_path / "run"
    argv = _argv(arith_world, run_dir, "--num-rollout", "6", "--load-debug-rollout-data", str(dump),
                 "--debug-train-only", "--critic-lr", "5e-3", "--num-critic-only-steps", "6")  # fmt: skip
    assert main(argv) == 0
    rows = read_metrics(run_dir)
    # gamma = lambd = 1 and no KL penalty: every token's return is its sequence's reward.
    assert all(r["rollout/returns"] == pytest.approx(float(rewards.mean())) for r in rows)
    losses = [r["train/critic-value_loss"] for r in rows]
    # 0.5 * mean (R - V)^2 (per-sequence means, averaged): from V = 0, down to what the best
    # constant V = mean(R) achieves, 0.5 * Var(R). Adam at this lr then oscillates around it by
    # up to ~10% (a rollout drawn with other sampling noise ended 4% above it after 6 steps,
    # having been 0.5% above the step before), so: some step reaches it within 2%, and the last
    # is within 15% of it.
    best = 0.5 * float(rewards.var(unbiased=False))
    assert losses[0] == pytest.approx(0.5 * float((rewards**2).mean()))
    assert min(losses[1:]) < 1.02 * best < losses[0], losses
    assert losses[-1] < 1.15 * best, losses


def test_resumed_ppo_run_repeats_the_next_step(arith_world, tmp_path):
    common = ("--rollout-shuffle", "--num-critic-only-steps", "1", "--kl-coef", "0.01")
    assert main(_argv(arith_world, tmp_path / "straight", "--num-rollout", "3", *common)) == 0
    ckpt = tmp_path / "ckpt"
    assert (
        main(_argv(arith_world, tmp_path / "first", "--num-rollout", "2", "--save", str(ckpt), *common)) == 0
    )
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    argv = _argv(arith_world, tmp_path / "resumed", "--num-rollout", "3", "--load", str(ckpt), *common)
    assert main(argv) == 0

    def comparable(row):
        return {k: v for k, v in row.items() if not k.startswith("perf/") and k != "time"}

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [2]
    assert comparable(resumed[0]) == comparable(straight[2])
    assert "train/critic-value_loss" in resumed[0] and "train/pg_loss" in resumed[0]

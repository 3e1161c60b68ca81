"""Shared helpers of the ``miles train`` tests."""

from __future__ import annotations


def train_argv(world, run_dir, *extra):
    """``miles train`` argv on the toy arithmetic world (``arith_world``), GRPO at toy size."""
    return ["train", "--hf-checkpoint", str(world / "model"), "--prompt-data", str(world / "train.jsonl"),
            "--input-key", "prompt", "--label-key", "label", "--apply-chat-template", "--rm-type", "exact",
            "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--rollout-max-response-len", "4",
            "--lr", "1e-3", "--run-dir", str(run_dir), *extra]  # fmt: skip

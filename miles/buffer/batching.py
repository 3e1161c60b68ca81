"""Groups of samples -> one packed ``TrainBatch``: the bridge from the rollout to the trainer.

The trainer takes it from there (:func:`miles.train.rl_step.rl_step`: scores, advantages by the
chosen estimator, optimizer steps); the groups' rewards travel as ``TrainBatch.rewards``.

Token alignment (see ``TrainBatch``): sequence ``i`` is ``prompt_ids + response_ids``; entry ``t``
of the token-aligned tensors describes predicting token ``t``. Response token ``j`` sits at
``t = P + j``, so its rollout log-prob and loss-mask entry land there; prompt positions carry 0.

Samples that cannot be trained on (failed, aborted, or without a reward) keep their place in the
group — the estimators need whole groups — but get a zero loss mask, and their reward is replaced
by the mean of the group's valid rewards so they do not move the group's baseline.

Rollout routing replay (R3): ``Sample.routed_experts`` ``[P + R - 1, layers, top_k]`` (row ``t``:
the experts of the forward at token ``t``) lands on the sequence's first ``P + R - 1`` rows of
``TrainBatch.routed_experts``; the last token of each sequence (never fed to the engine) gets a
row of -1 ("no record"), and so does every row of a sample without a usable record (one that is
not trained on). The batch has ``routed_experts`` when any sample has one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from miles.types import Group, Sample, TrainBatch


class BatchingError(ValueError):
    """Groups that cannot form a batch (uneven sizes, inconsistent per-token fields)."""


def is_trainable(sample: Sample) -> bool:
    return sample.status.trainable and sample.reward is not None and sample.error is None


def effective_rewards(group: Group) -> list[float]:
    """Rewards with untrainable samples replaced by the mean of the group's valid rewards (0 if none)."""
    valid = [float(s.reward) for s in group.samples if is_trainable(s) and s.reward is not None]
    fill = sum(valid) / len(valid) if valid else 0.0
    return [float(s.reward) if is_trainable(s) and s.reward is not None else fill for s in group.samples]


def build_train_batch(groups: Sequence[Group]) -> TrainBatch:
    """Pack every sample of ``groups`` (in order) into a ``TrainBatch`` with zero advantages.

    All groups must have the same size (the estimators normalise over fixed-size groups).
    """
    if not groups:
        raise BatchingError("no groups to batch")
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise BatchingError(f"groups must all have the same size, got sizes {sorted(sizes)}")
    ids: list[int] = []
    mask: list[float] = []
    logprobs: list[float] = []
    cu = [0]
    rewards: list[float] = []
    response_lens: list[int] = []
    indices: list[int] = []
    versions: list[str] = []
    token_versions: list[int] | None = []
    for group in groups:
        rewards += effective_rewards(group)
        for s in group.samples:
            s.check()
            if not s.prompt_ids:
                raise BatchingError(f"sample {s.index} has no prompt_ids")
            trainable = is_trainable(s)
            p, r = len(s.prompt_ids), s.response_len
            ids += s.prompt_ids + s.response_ids
            mask += [0.0] * p + ([float(m) for m in s.effective_loss_mask()] if trainable else [0.0] * r)
            lp = s.rollout_logprobs if s.rollout_logprobs is not None else [0.0] * r
            logprobs += [0.0] * p + [float(x) for x in lp]
            cu.append(cu[-1] + p + r)
            response_lens.append(r)
            indices.append(s.index)
            versions.append(s.weight_versions[-1] if s.weight_versions else "")
            known = s.token_versions()
            if token_versions is not None and known is not None:
                token_versions += [min(known, default=-1)] * p + known
            else:
                token_versions = None
    routed = _pack_routed_experts([s for g in groups for s in g.samples])
    cu_t = torch.tensor(cu, dtype=torch.int32)
    lengths = cu_t[1:] - cu_t[:-1]
    positions = torch.arange(cu[-1]) - torch.repeat_interleave(cu_t[:-1].long(), lengths.long())
    total = cu[-1]
    batch = TrainBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=positions,
        cu_seqlens=cu_t,
        loss_mask=torch.tensor(mask, dtype=torch.float32),
        rollout_logprobs=torch.tensor(logprobs, dtype=torch.float32),
        advantages=torch.zeros(total, dtype=torch.float32),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        response_lens=torch.tensor(response_lens, dtype=torch.long),
        sample_indices=tuple(indices),
        weight_versions=tuple(versions),
        routed_experts=routed,
        rollout_versions=None if token_versions is None else torch.tensor(token_versions, dtype=torch.long),
    )
    batch.check()
    return batch


def _pack_routed_experts(samples: Sequence[Sample]) -> torch.Tensor | None:
    records = [s.routed_experts for s in samples if s.routed_experts is not None]
    if not records:
        return None
    shapes = {tuple(r.shape[1:]) for r in records if r.shape[0] > 0}
    if len(shapes) > 1:
        raise BatchingError(
            f"samples' routed_experts have different [layers, top_k] shapes: {sorted(shapes)}"
        )
    if not shapes:
        return None
    row_shape = shapes.pop()
    out = np.full((sum(s.total_len for s in samples), *row_shape), -1, dtype=np.int32)
    start = 0
    for s in samples:
        rec, n = s.routed_experts, s.total_len - 1
        if rec is not None and rec.shape == (n, *row_shape):
            out[start : start + n] = rec
        elif is_trainable(s):
            got = "none" if rec is None else f"shape {tuple(rec.shape)}"
            raise BatchingError(
                f"sample {s.index}: routed_experts must be [{n}, {row_shape[0]}, {row_shape[1]}] "
                f"(prompt + response - 1 tokens), got {got}"
            )
        start += s.total_len
    return torch.from_numpy(out)

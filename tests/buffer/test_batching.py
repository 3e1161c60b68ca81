"""Groups -> TrainBatch: token alignment, failed samples (and the advantages they leave), checks."""

from __future__ import annotations

import pytest
import torch

from miles.algo.advantages import AdvantageParams, with_advantages
from miles.buffer.batching import BatchingError, build_train_batch, effective_rewards
from miles.types import Group, Sample, SampleStatus


def _sample(i, prompt, response, reward, status=SampleStatus.COMPLETED, mask=None, version="0"):
    return Sample(
        prompt_ids=prompt,
        response_ids=response,
        rollout_logprobs=[-0.5 - k for k in range(len(response))],
        loss_mask=mask,
        reward=reward,
        status=status,
        index=i,
        weight_versions=[version],
    )


def test_token_alignment_of_one_sequence():
    g = Group(0, (_sample(0, [5, 6], [7, 8, 9], 1.0, mask=[1, 0, 1]), _sample(1, [5], [4], 0.0)))
    b = build_train_batch([g])
    assert b.input_ids.tolist() == [5, 6, 7, 8, 9, 5, 4]
    assert b.positions.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 5, 7]
    # response token j sits at position P + j; prompt positions carry no loss
    assert b.loss_mask.tolist() == [0, 0, 1, 0, 1, 0, 1]
    assert b.rollout_logprobs.tolist() == [0, 0, -0.5, -1.5, -2.5, 0, -0.5]
    assert b.response_lens.tolist() == [3, 1] and b.sample_indices == (0, 1)
    assert b.rewards.tolist() == [1.0, 0.0]


def test_failed_samples_are_masked_and_do_not_move_the_baseline():
    g = Group(
        0,
        (
            _sample(0, [1], [2], 1.0),
            _sample(1, [1], [3], 0.0),
            _sample(2, [1], [], None, status=SampleStatus.FAILED),
        ),
    )
    assert effective_rewards(g) == [1.0, 0.0, 0.5]
    b = with_advantages(build_train_batch([g]), "grpo", AdvantageParams(group_size=3))
    assert b.loss_mask[b.cu_seqlens[2] :].sum() == 0
    adv = b.advantages
    assert adv[1] > 0 > adv[3]  # token positions of the two valid responses
    assert torch.allclose(adv[1], -adv[3])


def test_grpo_advantages_per_group():
    groups = [
        Group(0, (_sample(0, [1], [2, 2], 1.0), _sample(1, [1], [3], 0.0))),
        Group(1, (_sample(2, [1], [2], 1.0), _sample(3, [1], [3], 1.0))),
    ]
    b = with_advantages(build_train_batch(groups), "grpo", AdvantageParams(group_size=2))
    per_token = b.advantages * b.loss_mask
    assert per_token[1] == per_token[2] > 0 and per_token[4] < 0
    assert per_token[5:].abs().sum() == 0  # a group with equal rewards has no signal
    assert b.returns is not None


def test_uneven_groups_and_inconsistent_samples_are_rejected():
    a = Group(0, (_sample(0, [1], [2], 1.0), _sample(1, [1], [2], 0.0)))
    c = Group(1, (_sample(2, [1], [2], 1.0),))
    with pytest.raises(BatchingError, match=r"same size, got sizes \[1, 2\]"):
        build_train_batch([a, c])
    with pytest.raises(BatchingError, match="no groups"):
        build_train_batch([])
    bad = _sample(3, [1], [2, 3], 1.0, mask=[1])
    with pytest.raises(ValueError, match="loss_mask has 1 entries, response_ids has 2"):
        build_train_batch([Group(0, (bad,))])
    with pytest.raises(BatchingError, match="sample 4 has no prompt_ids"):
        build_train_batch([Group(0, (_sample(4, [], [2], 1.0),))])

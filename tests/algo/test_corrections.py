import math

import pytest
import torch

from miles.algo import CORRECTIONS, POLICY_LOSSES, CorrectionParams, apply_correction, mismatch_metrics

CU = torch.tensor([0, 4, 9, 12], dtype=torch.int32)
MASK = torch.tensor([0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.float32)


@pytest.mark.parametrize("name", ["none", "tis", "mis"])
def test_equal_logprobs_make_every_correction_the_identity(name):
    logp = torch.randn(12) - 1.0
    out = apply_correction(name, logp, logp.clone(), MASK, CU)
    assert torch.equal(out.weights, torch.ones(12))
    assert torch.equal(out.loss_mask, MASK)
    assert out.metrics["train_rollout_logprob_abs_diff"].item() == 0.0
    assert out.metrics["mismatch_k3_kl"].item() == 0.0
    for key in ["tis_clipfrac", "mis_mask_frac", "mis_token_mask_frac", "mis_seq_mask_frac", "mis_veto_frac"]:
        if key in out.metrics:
            assert out.metrics[key].item() == 0.0, key
    if "tis_weight_mean" in out.metrics:
        assert out.metrics["tis_weight_mean"].item() == 1.0 and out.metrics["tis_weight_max"].item() == 1.0


@pytest.mark.parametrize("name", ["none", "tis", "mis"])
def test_no_gradient_through_weights(name):
    train = (torch.randn(12) * 0.05).requires_grad_(True)
    rollout = torch.zeros(12)
    out = apply_correction(name, train, rollout, MASK, CU)
    assert not out.weights.requires_grad and not out.loss_mask.requires_grad
    assert all(not v.requires_grad for v in out.metrics.values())
    # Bypass mode: the policy log-probs feed both the ratio and the weights; the weights stay constants.
    adv = torch.randn(12)
    loss, _ = POLICY_LOSSES.get("ppo")(train, rollout, adv, out.loss_mask, CU, weights=out.weights)
    (grad,) = torch.autograd.grad(loss, train)
    loss_plain, _ = POLICY_LOSSES.get("ppo")(train, rollout, adv, out.loss_mask, CU)
    (grad_plain,) = torch.autograd.grad(loss_plain, train)
    torch.testing.assert_close(grad, grad_plain * out.weights)


def test_tis_hand_computed():
    cu, mask = torch.tensor([0, 4]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    train = torch.log(torch.tensor([2.5, 0.5, 1.0, 7.0]))
    rollout = torch.zeros(4)
    out = CORRECTIONS.get("tis")(train, rollout, mask, cu, CorrectionParams(tis_clip=2.0, tis_clip_low=0.6))
    torch.testing.assert_close(out.weights, torch.tensor([2.0, 0.6, 1.0, 1.0]))  # 1 outside the mask
    assert torch.equal(out.loss_mask, mask)
    assert out.metrics["tis_weight_mean"].item() == pytest.approx(3.6 / 3)
    assert out.metrics["tis_weight_max"].item() == pytest.approx(2.0)
    assert out.metrics["tis_clipfrac"].item() == pytest.approx(2 / 3)


def test_mismatch_metrics_hand_computed():
    mask = torch.tensor([1.0, 1.0, 0.0])
    train = torch.tensor([math.log(2), math.log(2), 5.0])
    rollout = torch.zeros(3)
    m = mismatch_metrics(train, rollout, mask)
    assert m["train_rollout_logprob_abs_diff"].item() == pytest.approx(math.log(2))
    assert m["mismatch_kl"].item() == pytest.approx(-math.log(2))
    assert m["mismatch_k3_kl"].item() == pytest.approx(2 - math.log(2) - 1)
    # the masked token (ratio e^5) counts in neither
    assert m["is_ratio_mean"].item() == pytest.approx(2.0)
    assert m["is_ratio_max"].item() == pytest.approx(2.0)


def _mis(train, rollout, mask, cu, **kw):
    defaults = dict(mis_low=None, mis_high=None, mis_seq_low=None, mis_seq_high=None, mis_veto=None)
    defaults.update(kw)
    return CORRECTIONS.get("mis")(train, rollout, mask, cu, CorrectionParams(**defaults))


def test_mis_token_mask():
    cu, mask = torch.tensor([0, 4]), torch.ones(4)
    train = torch.log(torch.tensor([3.0, 1.2, 0.3, 1.0]))
    out = _mis(train, torch.zeros(4), mask, cu, mis_low=0.5, mis_high=2.0, tis_clip=1.1)
    assert out.loss_mask.tolist() == [0.0, 1.0, 0.0, 1.0]
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 1.1, 1.0, 1.0]))  # kept tokens truncated
    assert out.metrics["mis_mask_frac"].item() == pytest.approx(0.5)
    assert out.metrics["mis_token_mask_frac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("per_token_ratio,kept", [(1.1, False), (1.0005, True), (0.995, True), (0.98, False)])
def test_geometric_sequence_mask_is_length_independent(per_token_ratio, kept):
    decisions = []
    for length in (10, 100):
        cu, mask = torch.tensor([0, length]), torch.ones(length)
        train = torch.full((length,), math.log(per_token_ratio))
        out = _mis(train, torch.zeros(length), mask, cu, mis_seq_low=0.99, mis_seq_high=1.001)
        decisions.append(bool(out.loss_mask.all()))
        assert bool(out.loss_mask.any()) == bool(out.loss_mask.all())  # whole sequence or nothing
    assert decisions == [kept, kept]


def test_geometric_mask_drops_only_the_bad_sequence():
    train = torch.zeros(12)
    train[6:9] = math.log(1.1)  # sequence 1's trained tokens drift
    train[4] = 50.0  # untrained token: ignored
    out = _mis(train, torch.zeros(12), MASK, CU, mis_seq_low=0.99, mis_seq_high=1.001)
    expected = MASK.clone()
    expected[4:9] = 0.0
    assert torch.equal(out.loss_mask, expected)
    assert out.metrics["mis_seq_mask_frac"].item() == pytest.approx(1 / 3)


def test_veto_masks_whole_sequence():
    train = torch.zeros(12)
    train[2] = math.log(1e-5)  # one catastrophic token in sequence 0
    out = _mis(train, torch.zeros(12), MASK, CU, mis_veto=1e-4)
    expected = MASK.clone()
    expected[:4] = 0.0
    assert torch.equal(out.loss_mask, expected)
    assert out.metrics["mis_veto_frac"].item() == pytest.approx(1 / 3)
    # the same token on an untrained position is not a veto
    mask = MASK.clone()
    mask[2] = 0.0
    assert torch.equal(_mis(train, torch.zeros(12), mask, CU, mis_veto=1e-4).loss_mask, mask)
    # without the veto (and no other criterion) nothing is masked
    assert torch.equal(_mis(train, torch.zeros(12), MASK, CU).loss_mask, MASK)


def test_mis_defaults_combine_criteria():
    train = torch.zeros(12)
    train[10] = math.log(1.0004)  # within every bound
    out = apply_correction("mis", train, torch.zeros(12), MASK, CU)
    assert torch.equal(out.loss_mask, MASK)
    train[10] = math.log(1.5)  # token ok (in [0.5, 2]) but geometric mean of seq 2 exceeds 1.001
    out = apply_correction("mis", train, torch.zeros(12), MASK, CU)
    assert out.loss_mask[9:].sum().item() == 0.0 and torch.equal(out.loss_mask[:9], MASK[:9])


def test_params_validation():
    with pytest.raises(ValueError, match="tis_clip"):
        CorrectionParams(tis_clip=0.9)
    with pytest.raises(ValueError, match="mis_seq_low"):
        CorrectionParams(mis_seq_low=1.01)
    with pytest.raises(ValueError, match="mis_veto"):
        CorrectionParams(mis_veto=1.0)
    with pytest.raises(ValueError, match="must all be"):
        apply_correction("tis", torch.zeros(12), torch.zeros(11), MASK, CU)

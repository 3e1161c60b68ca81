import math

import pytest
import torch

from miles.algo import (
    POLICY_LOSSES,
    entropy_loss,
    kl_estimate,
    kl_loss,
    loss_normalizer,
    policy_loss_for_estimator,
    reduce_loss,
    sft_loss,
    value_loss,
)
from miles.algo.losses import clipped_surrogate, gspo_sequence_ratio

CU = torch.tensor([0, 2, 5, 6], dtype=torch.int32)  # lengths 2, 3, 1
MASK = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
VALS = torch.tensor([1.0, 3.0, 100.0, 2.0, 4.0, 8.0])


# ----------------------------------------------------------------------------- reductions


def test_reductions_hand_computed():
    assert reduce_loss(VALS, MASK, CU, "token_mean").item() == pytest.approx(18 / 5)
    # seq means: 2, 3, 8
    assert reduce_loss(VALS, MASK, CU, "seq_mean").item() == pytest.approx(13 / 3)
    # seq sums: 4, 6, 8
    assert reduce_loss(VALS, MASK, CU, "seq_mean_token_sum").item() == pytest.approx(18 / 3)
    # Dr.GRPO: divide by a constant max length too.
    norm = loss_normalizer("seq_mean_token_sum", MASK, CU, max_len=4)
    assert reduce_loss(VALS, MASK, CU, "seq_mean_token_sum", norm).item() == pytest.approx(18 / 12)
    with pytest.raises(ValueError, match="max_len"):
        loss_normalizer("token_mean", MASK, CU, max_len=4)


def test_all_masked_reduces_to_zero():
    for name in ["token_mean", "seq_mean", "seq_mean_token_sum"]:
        assert reduce_loss(VALS, torch.zeros(6), CU, name).item() == 0.0


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean", "seq_mean_token_sum"])
def test_micro_batches_with_global_normalizer_equal_whole_batch(reduction):
    # Mathematically equal; numerically equal up to float64 rounding (sum of a/N + b/N vs (a + b)/N).
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2, 7, 4, 1]
    total = sum(lengths)
    vals = torch.randn(total, generator=gen, dtype=torch.float64).requires_grad_(True)
    mask = (torch.rand(total, generator=gen) > 0.3).double()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    whole = reduce_loss(vals, mask, cu, reduction)
    (g_whole,) = torch.autograd.grad(whole, vals)

    splits = [(0, 2), (2, 3), (3, 6)]  # sequence ranges of three micro-batches
    parts = []
    for a, b in splits:
        s, e = int(cu[a]), int(cu[b])
        parts.append((vals[s:e], mask[s:e], cu[a : b + 1] - cu[a]))
    normalizer = sum(loss_normalizer(reduction, m, c) for _, m, c in parts)
    accumulated = sum(reduce_loss(v, m, c, reduction, normalizer) for v, m, c in parts)
    torch.testing.assert_close(accumulated, whole, atol=1e-14, rtol=1e-14)
    (g_acc,) = torch.autograd.grad(accumulated, vals)
    torch.testing.assert_close(g_acc, g_whole, atol=1e-15, rtol=1e-14)
    # Without the global normaliser each micro-batch would be normalised locally: not the same.
    local = sum(reduce_loss(v, m, c, reduction) for v, m, c in parts) / len(parts)
    assert abs(local.item() - whole.item()) > 1e-6


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_hand_computed():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    ln2 = math.log(2)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(ln2)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * ln2**2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 + ln2 - 1)
    assert kl_estimate(logp, ref, "low_var_kl").item() == pytest.approx(0.5 + ln2 - 1)
    # low_var_kl clamps k3 at 10
    big = kl_estimate(torch.tensor([0.0]), torch.tensor([20.0]), "k3").item()
    assert big == pytest.approx(math.exp(20) - 21, rel=1e-5)
    assert kl_estimate(torch.tensor([0.0]), torch.tensor([20.0]), "low_var_kl").item() == 10.0
    x = torch.randn(50)
    for kind in ["k1", "k2", "k3", "low_var_kl"]:
        assert torch.equal(kl_estimate(x, x, kind), torch.zeros(50))
    assert (kl_estimate(x, torch.randn(50), "k3") >= 0).all()


def test_kl_loss_is_coef_times_reduced_estimate():
    logp = torch.randn(6, requires_grad=True)
    ref = torch.randn(6)
    loss, metrics = kl_loss(logp, ref, MASK, CU, coef=0.3, kind="k3")
    expected = reduce_loss(kl_estimate(logp, ref, "k3"), MASK, CU)
    torch.testing.assert_close(loss, 0.3 * expected)
    torch.testing.assert_close(metrics["kl_loss"], expected.detach())
    loss.backward()
    assert logp.grad is not None and logp.grad[2] == 0.0


# ----------------------------------------------------------------------------- PPO


def test_ratio_one_leaves_clip_inactive():
    logp = torch.randn(6, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 5.0, 0.5, 3.0, -1.0])
    for name in ["ppo", "gspo"]:
        loss, m = POLICY_LOSSES.get(name)(logp, logp.detach(), adv, MASK, CU)
        assert m["pg_clipfrac"].item() == 0.0
        assert m["ppo_kl"].item() == 0.0
        torch.testing.assert_close(loss, -(adv * MASK).sum() / MASK.sum())
        # gradient of -r*A at r = 1 is -A per token / number of trained tokens
        (grad,) = torch.autograd.grad(loss, logp)
        torch.testing.assert_close(grad, -adv * MASK / MASK.sum())


@pytest.mark.parametrize("name", ["ppo", "gspo"])
def test_garbage_on_untrained_tokens_is_ignored(name):
    logp = torch.tensor([-1.0, -2.0, 80.0, -1.0, -0.5, -3.0], requires_grad=True)
    old = torch.tensor([-1.0, -2.0, -90.0, -1.0, -0.5, -3.0])
    adv = torch.tensor([1.0, 1.0, float("nan"), 1.0, 1.0, 1.0])
    loss, m = POLICY_LOSSES.get(name)(logp, old, adv, MASK, CU)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(grad).all() and grad[2].item() == 0.0


def test_ppo_hand_computed():
    ratio = torch.tensor([1.5, 0.5, 1.0, 1.5, 0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0])
    old = torch.zeros(5)
    logp = ratio.log()
    cu, mask = torch.tensor([0, 5]), torch.ones(5)
    loss, m = POLICY_LOSSES.get("ppo")(logp, old, adv, mask, cu, eps_clip=0.2)
    # per token: max(-1.5, -1.2) = -1.2 (clipped); -0.5; 1.0; max(1.5, 1.2) = 1.5; max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0 + 1.5 + 0.8) / 5)
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 5)
    assert m["ppo_kl"].item() == pytest.approx(-logp.mean().item())
    assert "pg_clipfrac_c" not in m


def test_clip_higher():
    ratio, adv = torch.tensor([1.25]), torch.tensor([1.0])
    sym, clipped_sym, _ = clipped_surrogate(ratio, adv, 0.2)
    high, clipped_high, _ = clipped_surrogate(ratio, adv, 0.2, eps_clip_high=0.28)
    assert sym.item() == pytest.approx(-1.2) and clipped_sym.item() == 1.0
    assert high.item() == pytest.approx(-1.25) and clipped_high.item() == 0.0
    # the lower bound is still 1 - eps_clip
    low, _, _ = clipped_surrogate(torch.tensor([0.5]), torch.tensor([-1.0]), 0.2, eps_clip_high=0.28)
    assert low.item() == pytest.approx(0.8)


def test_dual_clip_only_affects_negative_advantages():
    ratio = torch.tensor([5.0, 5.0, 0.5, 1.0, 10.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0, -2.0])
    plain, _, _ = clipped_surrogate(ratio, adv, 0.2)
    dual, _, dual_frac = clipped_surrogate(ratio, adv, 0.2, eps_clip_c=3.0)
    positive = adv > 0
    assert torch.equal(dual[positive], plain[positive])
    # negative advantages with a large ratio are capped at -c * A
    assert dual[1].item() == pytest.approx(3.0) and plain[1].item() == pytest.approx(5.0)
    assert dual[4].item() == pytest.approx(6.0) and plain[4].item() == pytest.approx(20.0)
    assert dual[2].item() == plain[2].item()
    assert dual_frac.tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]
    (grad,) = torch.autograd.grad(dual.sum(), ratio)
    assert grad[1].item() == 0.0 and grad[4].item() == 0.0  # capped: constant in the ratio

    cu, mask = torch.tensor([0, 5]), torch.ones(5)
    _, m = POLICY_LOSSES.get("ppo")(ratio.detach().log(), torch.zeros(5), adv, mask, cu, eps_clip_c=3.0)
    assert m["pg_clipfrac_c"].item() == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="> 1"):
        clipped_surrogate(ratio, adv, 0.2, eps_clip_c=1.0)


def test_weights_scale_loss_without_receiving_gradient():
    logp = torch.randn(6, requires_grad=True)
    old = logp.detach() + 0.01 * torch.randn(6)
    adv = torch.randn(6)
    weights = torch.rand(6, requires_grad=True)
    loss_w, _ = POLICY_LOSSES.get("ppo")(logp, old, adv, MASK, CU, weights=weights)
    loss_w.backward()
    assert weights.grad is None
    grad_w = logp.grad.clone()
    logp.grad = None
    losses, _, _ = clipped_surrogate(torch.exp(logp - old), adv, 0.2)
    (losses * weights.detach() * MASK).sum().div(MASK.sum()).backward()
    torch.testing.assert_close(grad_w, logp.grad)


# ----------------------------------------------------------------------------- GSPO


def test_gspo_ratio_is_length_normalised():
    # Two sequences of 2 and 8 tokens, each token's log-ratio 0.1: s_i = exp(0.1), not exp(0.1 * L).
    cu = torch.tensor([0, 2, 10])
    mask = torch.ones(10)
    old = torch.zeros(10)
    logp = torch.full((10,), 0.1)
    ratio = gspo_sequence_ratio(logp, old, mask, cu)
    torch.testing.assert_close(ratio, torch.full((10,), math.exp(0.1)))
    # masked tokens do not count: a huge log-ratio on an untrained token changes nothing
    logp2 = logp.clone()
    logp2[3] = 5.0
    mask2 = mask.clone()
    mask2[3] = 0.0
    torch.testing.assert_close(gspo_sequence_ratio(logp2, old, mask2, cu)[mask2 > 0], ratio[mask2 > 0])
    # uneven per-token ratios: geometric mean over the sequence
    logp3 = torch.tensor([0.3, -0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8])
    r3 = gspo_sequence_ratio(logp3, old, mask, cu)
    torch.testing.assert_close(r3[:2], torch.full((2,), math.exp(0.1)))
    torch.testing.assert_close(r3[2:], torch.full((8,), math.exp(0.1)))


def test_gspo_clips_whole_sequences():
    cu = torch.tensor([0, 3, 6])
    mask = torch.ones(6)
    old = torch.zeros(6)
    # sequence 0 drifts by 1e-2 per token (clipped with eps 3e-4), sequence 1 by 1e-4 (inside)
    logp = torch.tensor([0.01, 0.01, 0.01, 1e-4, 1e-4, 1e-4], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    loss, m = POLICY_LOSSES.get("gspo")(logp, old, adv, mask, cu)
    assert m["pg_clipfrac"].item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.equal(grad[:3], torch.zeros(3))
    torch.testing.assert_close(grad[3:], torch.full((3,), -math.exp(1e-4) / 6))


def test_gspo_gradient_matches_sequence_objective():
    # The token form with seq_mean reduction has the gradient of the paper's sequence objective
    # J = 1/G sum_i s_i A_i with s_i = exp(mean_t(logp - old)) (unclipped regime).
    gen = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 4, 5, 11])
    mask = torch.tensor([0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0.0])
    old = torch.randn(11, generator=gen)
    logp = (old + 1e-5 * torch.randn(11, generator=gen)).requires_grad_(True)
    adv_seq = torch.tensor([0.5, -1.0, 2.0])
    adv = adv_seq.repeat_interleave(torch.tensor([4, 1, 6]))
    loss, _ = POLICY_LOSSES.get("gspo")(logp, old, adv, mask, cu, eps_clip=10.0, reduction="seq_mean")
    (g_token,) = torch.autograd.grad(loss, logp)
    s = []
    for i, (a, b) in enumerate([(0, 4), (4, 5), (5, 11)]):
        mk = mask[a:b]
        s.append(torch.exp(((logp[a:b] - old[a:b]) * mk).sum() / mk.sum().clamp(min=1)) * adv_seq[i])
    (g_seq,) = torch.autograd.grad(-torch.stack(s).mean(), logp)
    torch.testing.assert_close(g_token, g_seq)


def test_policy_loss_for_estimator():
    assert policy_loss_for_estimator("gspo") == "gspo"
    for name in ["grpo", "dr_grpo", "ppo", "reinforce_plus_plus"]:
        assert policy_loss_for_estimator(name) == "ppo"


# ----------------------------------------------------------------------------- entropy, value, SFT


def test_entropy_loss():
    ent = torch.tensor([1.0, 2.0, 9.0, 3.0, 4.0, 5.0], requires_grad=True)
    loss, m = entropy_loss(ent, MASK, CU, coef=0.01)
    assert m["entropy"].item() == pytest.approx(3.0)
    assert loss.item() == pytest.approx(-0.03)
    loss.backward()
    assert (ent.grad[MASK > 0] < 0).all()  # minimising the loss raises entropy


def test_value_loss_hand_computed():
    values = torch.tensor([1.0, 2.0], requires_grad=True)
    old = torch.tensor([0.5, 2.0])
    returns = torch.tensor([2.0, 1.0])
    cu, mask = torch.tensor([0, 2]), torch.ones(2)
    loss, m = value_loss(values, old, returns, mask, cu, value_clip=0.2)
    # t0: clipped value 0.7 -> (0.7 - 2)^2 = 1.69 > (1 - 2)^2 = 1; t1: both 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert m["value_clipfrac"].item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, values)
    assert grad[0].item() == 0.0  # clipped term is constant in v
    assert grad[1].item() == pytest.approx(0.5 * 2 * (2.0 - 1.0) / 2)
    unclipped, m2 = value_loss(values, old, returns, mask, cu, value_clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2) and m2["value_clipfrac"].item() == 0.0


def test_sft_loss():
    logp = torch.tensor([-1.0, -2.0, -50.0, -3.0, -4.0, -5.0])
    loss, m = sft_loss(logp, MASK, CU)
    assert loss.item() == pytest.approx(3.0) and m["sft_loss"].item() == pytest.approx(3.0)
    assert sft_loss(logp, MASK, CU, reduction="seq_mean")[0].item() == pytest.approx((1.5 + 3.5 + 5.0) / 3)


def test_low_var_kl_has_a_finite_gradient_for_huge_ratios():
    """Regression: expm1 overflowed to inf and the clamp turned the gradient into NaN."""
    from miles.algo.losses import kl_estimate

    logp = torch.tensor([-95.0, -1.0], requires_grad=True)
    ref = torch.tensor([-0.5, -1.0])
    value = kl_estimate(logp, ref, "low_var_kl")
    value.sum().backward()
    assert torch.isfinite(value).all() and value[0] == 10.0
    assert torch.isfinite(logp.grad).all()

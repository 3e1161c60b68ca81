"""Decoupled PPO: equal to the standard loss on on-policy data, and weighted against the
behaviour policy otherwise."""

from __future__ import annotations

import pytest
import torch

from miles.algo import POLICY_LOSSES, CorrectionParams, decoupled_ppo_loss


def _batch(seed: int = 0, lengths: tuple[int, ...] = (5, 7, 4)):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    prox = -torch.rand(t, generator=g) * 3
    logp = (prox + 0.3 * torch.randn(t, generator=g)).requires_grad_(True)
    adv = torch.randn(t, generator=g)
    mask = (torch.rand(t, generator=g) > 0.2).float()
    return logp, prox, adv, mask, cu


@pytest.mark.parametrize("correction", ["tis", "mis", "none"])
@pytest.mark.parametrize("policy_loss", ["ppo", "gspo"])
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
def test_on_policy_data_gives_the_standard_loss_exactly(correction, policy_loss, reduction):
    logp, prox, adv, mask, cu = _batch()
    loss, metrics = decoupled_ppo_loss(
        logp, prox, prox.clone(), adv, mask, cu, correction=correction, policy_loss=policy_loss,
        eps_clip=0.2, reduction=reduction,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_(True)
    ref, ref_metrics = POLICY_LOSSES.get(policy_loss)(
        logp2, prox, adv, mask, cu, eps_clip=0.2, reduction=reduction
    )
    (ref_grad,) = torch.autograd.grad(ref, logp2)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)
    assert torch.equal(metrics["pg_clipfrac"], ref_metrics["pg_clipfrac"])


def test_stale_tokens_are_weighted_by_the_truncated_ratio_to_the_behaviour_policy():
    logp, prox, adv, mask, cu = _batch(1)
    behav = prox.clone()
    behav[3] = prox[3] - 2.0  # the engine was less likely to sample it: ratio e^2, truncated to 2
    behav[8] = prox[8] + 0.5  # more likely: ratio e^-0.5, kept
    params = CorrectionParams(tis_clip=2.0)
    loss, _ = decoupled_ppo_loss(logp, prox, behav, adv, mask, cu, correction="tis", correction_params=params)
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_(True)
    ref, _ = POLICY_LOSSES.get("ppo")(logp2, prox, adv, mask, cu)
    (ref_grad,) = torch.autograd.grad(ref, logp2)
    w = torch.ones_like(prox)
    w[3], w[8] = 2.0, float(torch.exp(torch.tensor(-0.5)))
    expected = ref_grad * w
    # Only the weights differ: each token's gradient is scaled by its weight (fp32, one product).
    torch.testing.assert_close(grad, expected, rtol=2 * torch.finfo(torch.float32).eps, atol=0.0)
    assert not torch.equal(grad, ref_grad) or float(mask[3] + mask[8]) == 0


def test_mis_rejects_what_the_behaviour_policy_rarely_sampled():
    logp, prox, adv, mask, cu = _batch(2)
    mask = torch.ones_like(mask)
    behav = prox.clone()
    behav[2] = prox[2] + 5.0  # ratio e^-5: outside [mis_low, mis_high]
    params = CorrectionParams(mis_seq_low=None, mis_seq_high=None, mis_veto=None)
    loss, metrics = decoupled_ppo_loss(
        logp, prox, behav, adv, mask, cu, correction="mis", correction_params=params
    )
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[2] == 0 and float(metrics["mis_mask_frac"]) == pytest.approx(1 / mask.numel())

import math

import pytest
import torch

from miles.algo import ADVANTAGE_ESTIMATORS, AdvantageParams, compute_advantages, normalize_advantages
from miles.algo.advantages import apply_kl_penalty, token_level_rewards

# 6 sequences = 2 groups of 3. Each sequence: prompt tokens (mask 0) then response tokens (mask 1).
LENGTHS = [3, 4, 2, 3, 5, 2]
MASKS = [[0, 1, 1], [0, 0, 1, 1], [0, 1], [0, 1, 1], [0, 1, 1, 1, 0], [0, 1]]
CU = torch.tensor([0, 3, 7, 9, 12, 17, 19], dtype=torch.int32)
MASK = torch.tensor([m for ms in MASKS for m in ms], dtype=torch.float32)
REWARDS = torch.tensor([1.0, 0.0, 2.0, 5.0, 5.0, 5.0])


def per_token(per_seq):
    return torch.tensor([v * m for v, ms in zip(per_seq, MASKS) for m in ms], dtype=torch.float32)


def run(name, **kw):
    tensors = {k: kw.pop(k) for k in ["kl", "values", "token_rewards"] if k in kw}
    params = AdvantageParams(group_size=kw.pop("group_size", 3), **kw)
    return ADVANTAGE_ESTIMATORS.get(name)(REWARDS, CU, MASK, params, **tensors)


def test_grpo_hand_computed():
    # group 1: mean 1, unbiased std 1 -> (0, -1, 1) / (1 + 1e-6); group 2: all equal -> 0.
    out = run("grpo")
    expected = per_token([0.0, -1 / (1 + 1e-6), 1 / (1 + 1e-6), 0.0, 0.0, 0.0])
    torch.testing.assert_close(out.advantages, expected)
    assert out.advantages.dtype == torch.float32 and not out.advantages.requires_grad


def test_dr_grpo_and_std_normalization_off():
    expected = per_token([0.0, -1.0, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(run("dr_grpo").advantages, expected)
    torch.testing.assert_close(run("grpo", std_normalization=False).advantages, expected)


def test_gspo_uses_grpo_advantages():
    assert torch.equal(run("gspo").advantages, run("grpo").advantages)


def test_rloo_hand_computed():
    # r_i - mean of the other two: 1 - 1 = 0, 0 - 1.5, 2 - 0.5.
    torch.testing.assert_close(run("rloo").advantages, per_token([0.0, -1.5, 1.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="group_size >= 2"):
        run("rloo", group_size=1)


def test_group_of_one_gives_zero():
    assert torch.equal(run("grpo", group_size=1).advantages, torch.zeros(19))


def test_kl_penalty_on_outcome_estimators():
    kl = torch.linspace(0.0, 1.8, 19)
    out = run("dr_grpo", kl=kl, kl_coef=0.1)
    torch.testing.assert_close(out.advantages, per_token([0.0, -1.0, 1.0, 0.0, 0.0, 0.0]) - 0.1 * kl * MASK)
    assert torch.equal(apply_kl_penalty(MASK, kl, 0.0, MASK), MASK)


def test_token_level_rewards():
    kl = torch.full((19,), 0.5)
    r = token_level_rewards(REWARDS, CU, MASK, kl, kl_coef=0.2)
    expected = -0.1 * MASK
    # last trained token of each sequence: 2, 6, 8, 11, 15 (16 is untrained), 18
    for idx, rew in zip([2, 6, 8, 11, 15, 18], REWARDS.tolist()):
        expected[idx] += rew
    torch.testing.assert_close(r, expected)


def _whiten(x, mask):
    sel = x[mask > 0].double()
    return ((x.double() - sel.mean()) / math.sqrt(sel.var(unbiased=True).item() + 1e-8) * mask).float()


def test_reinforce_plus_plus_hand_computed():
    # Two sequences, gamma 0.5, kl_coef 0.1.
    cu = torch.tensor([0, 3, 6])
    mask = torch.tensor([0.0, 1, 1, 0, 1, 1])
    kl = torch.tensor([9.0, 1.0, 2.0, 9.0, 0.0, 4.0])
    rewards = torch.tensor([1.0, -1.0])
    params = AdvantageParams(group_size=2, gamma=0.5, kl_coef=0.1)
    out = ADVANTAGE_ESTIMATORS.get("reinforce_plus_plus")(rewards, cu, mask, params, kl=kl)
    # token rewards: seq0 [0, -0.1, -0.2 + 1]; seq1 [0, 0, -0.4 - 1]
    # returns: seq0 t2 = 0.8, t1 = -0.1 + 0.4 = 0.3; seq1 t5 = -1.4, t4 = -0.7
    torch.testing.assert_close(out.returns, torch.tensor([0.0, 0.3, 0.8, 0.0, -0.7, -1.4]))
    torch.testing.assert_close(out.advantages, _whiten(out.returns, mask))
    sel = out.advantages[mask > 0].double()
    assert abs(sel.mean().item()) < 1e-6 and abs(sel.std().item() - 1) < 1e-4


def test_reinforce_plus_plus_baseline():
    kl = torch.full((19,), 1.0)
    out = run("reinforce_plus_plus_baseline", kl=kl, kl_coef=0.5)
    raw = per_token([0.0, -1.0, 1.0, 0.0, 0.0, 0.0]) - 0.5 * MASK
    torch.testing.assert_close(out.returns, raw)
    torch.testing.assert_close(out.advantages, _whiten(raw, MASK))


def _naive_gae(r, v, mask, cu, gamma, lambd):
    adv = torch.zeros_like(r, dtype=torch.float64)
    v = v * mask
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        last = 0.0
        for t in reversed(range(s, e)):
            nv = float(v[t + 1]) if t + 1 < e else 0.0
            delta = float(r[t]) + gamma * nv - float(v[t])
            last = delta + gamma * lambd * last
            adv[t] = last
    adv = adv.float() * mask
    return adv, (adv + v) * mask


def test_gae_hand_computed():
    cu = torch.tensor([0, 3])
    mask = torch.tensor([1.0, 1.0, 1.0])
    values = torch.tensor([0.5, 0.2, 0.4])
    out = ADVANTAGE_ESTIMATORS.get("gae")(
        torch.tensor([1.0]), cu, mask, AdvantageParams(gamma=0.9, lambd=0.8), values=values
    )
    # deltas: d2 = 1 - 0.4 = 0.6; d1 = 0 + 0.9*0.4 - 0.2 = 0.16; d0 = 0.9*0.2 - 0.5 = -0.32
    # A2 = 0.6; A1 = 0.16 + 0.72*0.6 = 0.592; A0 = -0.32 + 0.72*0.592 = 0.10624
    torch.testing.assert_close(out.advantages, torch.tensor([0.10624, 0.592, 0.6]))
    torch.testing.assert_close(out.returns, torch.tensor([0.60624, 0.792, 1.0]))


def test_gae_matches_loop_on_packed_batch():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(19, generator=gen)
    token_rewards = torch.randn(19, generator=gen) * MASK
    out = run("ppo", values=values, token_rewards=token_rewards, gamma=0.95, lambd=0.9)
    adv, ret = _naive_gae(token_rewards, values, MASK, CU, 0.95, 0.9)
    torch.testing.assert_close(out.advantages, adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.returns, ret, atol=1e-5, rtol=1e-5)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    values = torch.rand(19)
    out = run("gae", values=values)
    # single terminal reward per sequence: A_t = R - V_t on trained tokens.
    expected = per_token(REWARDS.tolist()) - values * MASK
    torch.testing.assert_close(out.advantages, expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="values"):
        run("gae")


def test_normalize_advantages():
    adv = torch.arange(19, dtype=torch.float32)
    out = normalize_advantages(adv, MASK)
    assert torch.equal(out[MASK == 0], torch.zeros(int((MASK == 0).sum())))
    torch.testing.assert_close(out, _whiten(adv, MASK))
    assert torch.equal(normalize_advantages(adv, torch.zeros(19)), torch.zeros(19))


def test_compute_advantages_normalize_flag():
    params = AdvantageParams(group_size=3, normalize=True)
    out = compute_advantages("dr_grpo", REWARDS, CU, MASK, params)
    torch.testing.assert_close(out.advantages, _whiten(per_token([0.0, -1.0, 1.0, 0.0, 0.0, 0.0]), MASK))


def test_input_validation():
    with pytest.raises(ValueError, match="groups of 4"):
        run("grpo", group_size=4)
    with pytest.raises(ValueError, match="rewards must have shape"):
        ADVANTAGE_ESTIMATORS.get("grpo")(REWARDS[:5], CU, MASK, AdvantageParams(group_size=1))
    with pytest.raises(ValueError, match="group_size"):
        AdvantageParams(group_size=0)

import pytest

from miles.algo import (
    ADVANTAGE_ESTIMATORS,
    CORRECTIONS,
    KL_ESTIMATORS,
    LOSS_REDUCTIONS,
    POLICY_LOSSES,
    Registry,
    UnknownNameError,
)


def test_register_get_names():
    reg: Registry[int] = Registry("thing")
    reg.add("b", 2)

    @reg.register("a", "alias")
    def f() -> int:
        return 1

    assert reg.get("a") is f and reg.get("alias") is f
    assert reg.get("b") == 2
    assert reg.names() == ["a", "alias", "b"]
    assert "a" in reg and "zzz" not in reg and len(reg) == 3


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(UnknownNameError) as info:
        ADVANTAGE_ESTIMATORS.get("grpoo")
    assert isinstance(info.value, KeyError)
    msg = str(info.value)
    assert "unknown advantage estimator 'grpoo'" in msg
    assert "did you mean 'grpo'" in msg
    for name in ADVANTAGE_ESTIMATORS.names():
        assert name in msg


def test_unknown_name_without_close_match():
    with pytest.raises(KeyError, match=r"known: k1, k2, k3, low_var_kl") as info:
        KL_ESTIMATORS.get("completely-different")
    assert "did you mean" not in str(info.value)


def test_duplicate_registration_raises():
    reg: Registry[int] = Registry("thing")
    reg.add("x", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("x", 2)


def test_registered_names():
    assert ADVANTAGE_ESTIMATORS.names() == [
        "dr_grpo",
        "gae",
        "grpo",
        "gspo",
        "ppo",
        "reinforce_plus_plus",
        "reinforce_plus_plus_baseline",
        "rloo",
    ]
    assert POLICY_LOSSES.names() == ["gspo", "ppo"]
    assert LOSS_REDUCTIONS.names() == ["seq_mean", "seq_mean_token_sum", "token_mean"]
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3", "low_var_kl"]
    assert CORRECTIONS.names() == ["mis", "none", "tis"]
    # slime's --advantage-estimator values all resolve.
    for name in ["grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"]:
        ADVANTAGE_ESTIMATORS.get(name)

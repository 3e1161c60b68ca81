"""Tolerances for two evaluations of one floating-point computation that sum in different orders.

Another CPU (its vector width, its BLAS kernels), another thread count, another micro-batch split
or another process layout changes the order of a computation's sums, so two such evaluations
agree only to rounding. How closely follows from the arithmetic, never from one machine's luck:

- Probabilistic rounding-error analysis (Higham & Mary, "A new approach to probabilistic rounding
  error analysis", SIAM J. Sci. Comput. 41(5), 2019): a sum of ``n`` terms, in any
  order, is within ``lambda * sqrt(n) * u * sum|terms|`` of its exact value (``u = eps / 2``) with
  probability at least ``1 - 2 n exp(-lambda**2 / 2)``. :data:`LAMBDA` = 8 makes that failure
  probability ``2.5e-14 * n`` per sum: negligible over every element of every comparison here.
- Two evaluations each carry such an error: their difference is within twice it, and the ``2``
  cancels the ``u = eps / 2``.
- A value computed through a chain of sums (the layers of a forward and a backward pass) carries
  the errors of every link; independent errors add like those of one sum of all their terms,
  ``terms`` below (:func:`step_terms` counts them for a training step). A gradient clipped to a
  global norm also carries the norm's relative rounding (``norm_terms`` squares), element by element.
- ``sum|terms|`` is taken as the largest magnitude of the values compared (over a tensor): an
  element that cancels to nearly zero owes its error to terms as large as its neighbours'.

Hence :func:`reduction_tol` = ``LAMBDA * eps(dtype) * sqrt(terms) * scale``.

Adam needs one more step (:func:`adam_atol`): its update divides the gradient by about ``|g| +
eps_adam``, so where ``|g|`` is below ``eps_adam`` a rounding difference in ``g`` reaches the weights
magnified by ``lr / eps_adam``, and where ``|g|`` is within rounding of zero the two runs may step
``lr`` in opposite directions. The bound is the update's range over the gradient's tolerance.

Where the design promises bitwise equality (batch-invariant kernels within one process, checkpoint
round trips, resume), tests assert ``torch.equal`` instead; these helpers are never for that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

LAMBDA = 8.0


def eps(dtype: torch.dtype = torch.float32) -> float:
    """The machine epsilon of ``dtype`` (the gap between 1 and the next representable number)."""
    return torch.finfo(dtype).eps


def reduction_tol(scale: float, terms: int, dtype: torch.dtype = torch.float32) -> float:
    """Largest expected difference between two evaluations of values of magnitude ``scale`` that
    come from chained sums of ``terms`` terms in all, in ``dtype`` (module docstring)."""
    return LAMBDA * eps(dtype) * math.sqrt(terms) * scale


def step_terms(spec: Any, num_tokens: int, backward: bool = True) -> int:
    """The terms summed on the way to a log-prob, a loss or a gradient in a step of the model
    ``spec`` (a ``ModelSpec``) on ``num_tokens`` packed tokens: the longest sum (over the vocabulary
    in the log-softmax, the hidden or intermediate width in a projection, the tokens in a weight
    gradient or an attention row), once per layer and for the LM head, in the forward pass and,
    with ``backward``, again in the backward pass."""
    widths = (spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.moe_intermediate_size)
    return max(*widths, num_tokens) * (2 if backward else 1) * (spec.num_hidden_layers + 1)


def num_elements(model: torch.nn.Module) -> int:
    """The elements of ``model``'s parameters (a tied one once): the terms of its gradient norm,
    whose rounding reaches every clipped gradient through the clipping coefficient."""
    return sum(p.numel() for p in model.parameters())


def assert_within(actual: Tensor, expected: Tensor, atol: Tensor | float, msg: str = "") -> None:
    """``|actual - expected| <= atol`` element-wise (``atol`` a tensor or a number); the message
    names the worst element, both values and its bound."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    diff = (actual.double() - expected.double()).abs()
    bound = torch.as_tensor(atol, dtype=torch.float64).expand_as(diff)
    excess = diff - bound
    if diff.numel() == 0 or bool((excess <= 0).all()):
        return
    i = int(excess.flatten().argmax())
    at = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), diff.shape))
    raise AssertionError(
        f"{msg}: {int((excess > 0).sum())} of {diff.numel()} elements beyond the bound; worst at "
        f"{at}: {float(actual.flatten()[i])!r} vs {float(expected.flatten()[i])!r}, "
        f"|diff| {float(diff.flatten()[i]):.3e} > {float(bound.flatten()[i]):.3e}"
    )


def assert_reduction_close(
    actual: Tensor, expected: Tensor, terms: int, msg: str = "", scale: float | None = None
) -> None:
    """``actual`` equals ``expected`` up to :func:`reduction_tol`, its ``scale`` by default the
    largest ``|expected|``."""
    if scale is None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert_within(actual, expected, reduction_tol(scale, terms, expected.dtype), msg)


def assert_grads_close(got: Mapping[str, Tensor], want: Mapping[str, Tensor], terms: int) -> None:
    """The same parameter names, each gradient within :func:`reduction_tol` of ``want``'s, scaled by
    that tensor's largest ``|gradient|``."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name, w in want.items():
        assert_reduction_close(got[name], w, terms, name)


def assert_metrics_close(
    got: Mapping[str, float],
    want: Mapping[str, float],
    terms: int,
    skip: Iterable[str] = (),
    term_scale: float = 1.0,
) -> None:
    """The same metric keys, each value within :func:`reduction_tol` of ``want``'s (fp32 sums).

    A metric is a mean or sum over tokens of per-token terms, or a norm, maximum or count;
    ``term_scale`` is the size of those terms (log-probabilities, log-ratios, standard-normal
    advantages: order one). A signed mean can cancel to far below its terms, so the scale is the
    larger of the metric and its terms."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k, v in want.items():
        if k in skip:
            continue
        tol = reduction_tol(max(abs(v), term_scale), terms)
        assert abs(got[k] - v) <= tol, f"{k}: {got[k]!r} vs {v!r}, |diff| {abs(got[k] - v):.3e} > {tol:.3e}"


def logprob_tol(model: torch.nn.Module, longest: int, temperature: float = 1.0) -> float:
    """How far two evaluations of one sampled token's log-prob by ``model`` (a ``CausalLM``) may
    differ when only their sums' order differs (another batch, thread count or CPU), for sequences
    of at most ``longest`` tokens sampled at ``temperature``.

    ``logprob = z_t / T - logsumexp(z / T)`` moves by at most twice the largest change of a logit
    ``z_j / T``, plus the rounding of the log-sum-exp's sum of ``V`` terms of at most 1 (relative:
    ``reduction_tol(1, V)``). A logit ``z_j = h . W_j`` comes out of the final RMSNorm
    (``|h|_2 <= max|g| sqrt(H)``, ``g`` its gain) and the LM head row ``W_j``, so its terms add up
    to at most ``max|g| sqrt(H) max_j |W_j|_2`` (Cauchy-Schwarz): the scale of its
    ``reduction_tol``. Its sums, once per layer and for the head: the hidden and intermediate
    widths, and the attention over at most the longest sequence."""
    spec = model.spec  # type: ignore[attr-defined]
    gain = model.model.norm.weight.detach()  # type: ignore[union-attr]
    head = model.lm_head.weight.detach()  # type: ignore[union-attr]
    logit_scale = float(gain.abs().max()) * math.sqrt(gain.numel()) * float(head.norm(dim=1).max())
    terms = max(spec.hidden_size, spec.intermediate_size, longest) * (spec.num_hidden_layers + 1)
    return 2 * reduction_tol(logit_scale / temperature, terms) + reduction_tol(1.0, head.shape[0])


AdamState = Mapping[str, Any]  # "exp_avg", "exp_avg_sq" (full tensors), "step" (int)


def adam_states(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, AdamState]:
    """``{parameter name: {"exp_avg", "exp_avg_sq", "step"}}`` of a ``torch.optim.AdamW`` over
    ``model``, as full local tensors (a DTensor's shards gathered: every rank must call this)."""

    def full(t: Tensor) -> Tensor:
        full_tensor = getattr(t, "full_tensor", None)
        return (full_tensor() if full_tensor is not None else t).detach().clone()

    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: {
            "exp_avg": full(s["exp_avg"]),
            "exp_avg_sq": full(s["exp_avg_sq"]),
            "step": int(s["step"]),
        }
        for p, s in optimizer.state.items()
    }


def _gradient(state: AdamState, beta1: float, before: AdamState | None) -> Tensor:
    # exp_avg = beta1 * (before's) + (1 - beta1) * g: the step's gradient, read back.
    m = state["exp_avg"].double()
    m0 = torch.zeros_like(m) if before is None else before["exp_avg"].double()
    return (m - beta1 * m0) / (1 - beta1)


def gradient_tol(g: Tensor, terms: int, norm_terms: int = 0) -> Tensor:
    """Element-wise bound on a rounding difference in the gradient ``g`` (one parameter's):
    :func:`reduction_tol` of its largest element over its own sums' ``terms``, plus, where the
    gradient was clipped to a global norm, the norm's relative rounding (a sum of ``norm_terms``
    squares) times each element: the clipping coefficient scales every element alike."""
    scale = float(g.abs().max()) if g.numel() else 0.0
    return reduction_tol(scale, terms) + reduction_tol(1.0, norm_terms) * g.abs()


def moment_tols(
    state: AdamState,
    betas: tuple[float, float],
    terms: int,
    norm_terms: int = 0,
    before: AdamState | None = None,
) -> tuple[Tensor, Tensor]:
    """``(d_exp_avg, d_exp_avg_sq)`` element-wise: how far two AdamW steps from the same earlier
    state (``before``; ``None``: zero moments) may leave the moments apart when their gradients
    differ by rounding only, ``|g' - g| <= dg`` (:func:`gradient_tol`). The moments add
    ``(1 - beta1) g`` and ``(1 - beta2) g**2``, which differ by at most ``(1 - beta1) dg`` and
    ``(1 - beta2) (2 |g| + dg) dg``."""
    b1, b2 = betas
    g = _gradient(state, b1, before)
    dg = gradient_tol(g, terms, norm_terms)
    return (1 - b1) * dg, (1 - b2) * (2 * g.abs() + dg) * dg


def assert_moments_close(
    got: Mapping[str, AdamState],
    want: Mapping[str, AdamState],
    betas: tuple[float, float],
    terms: int,
    norm_terms: int = 0,
    before: Mapping[str, AdamState] | None = None,
) -> None:
    """AdamW moments (``adam_states``) of two runs of one step from the same earlier state
    (``before``; ``None`` for the first step), per parameter within :func:`moment_tols`; the step
    counts equal."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name, w in want.items():
        assert got[name]["step"] == w["step"], name
        dm, dv = moment_tols(w, betas, terms, norm_terms, None if before is None else before[name])
        assert_within(got[name]["exp_avg"], w["exp_avg"], dm, f"{name} exp_avg")
        assert_within(got[name]["exp_avg_sq"], w["exp_avg_sq"], dv, f"{name} exp_avg_sq")


def _adam_direction(g: Tensor, a: Tensor, b: float, c: Tensor, d: float, adam_eps: float) -> Tensor:
    # u(g) = (a + b g) / (sqrt(c + d g**2) + adam_eps): AdamW's update direction as a function of the
    # step's gradient g, the earlier moments folded into a and c.
    return (a + b * g) / (torch.sqrt(c + d * g * g) + adam_eps)


def adam_atol(
    param: Tensor,
    state: AdamState,
    lr: float,
    betas: tuple[float, float],
    adam_eps: float,
    terms: int,
    norm_terms: int = 0,
    before: AdamState | None = None,
) -> Tensor:
    """Element-wise bound on how far two AdamW steps from the same parameters and state may leave a
    parameter apart when their gradients differ by rounding only: ``param``/``state`` are one run's
    result (the reference), ``before`` the state both started from (``None``: the first step, zero
    moments), ``lr`` the step's learning rate.

    With the bias corrections ``c1 = 1 - beta1**step``, ``c2 = 1 - beta2**step``, the update is
    ``lr * u(g)``, ``u(g) = (beta1 m0 + (1 - beta1) g) / c1 / (sqrt((beta2 v0 + (1 - beta2) g**2) / c2)
    + adam_eps)``, a function of the step's gradient ``g`` alone (read back from ``state``); the
    other run's gradient lies in ``g +- dg`` (:func:`gradient_tol`). The spread of ``u`` over that
    interval is its spread over the ends and the interior points where ``u' = 0`` (the roots of a
    quadratic), times ``lr``. Where ``|g|`` is below ``adam_eps`` that spread is about
    ``2 dg / adam_eps``, and where ``|g|`` is within ``dg`` of zero the two runs may step in
    opposite directions: rounding decides the sign of a gradient that small.

    Each side also rounds, by at most ``eps / 2`` relative each time: the new parameter once (and
    ``p * (1 - lr * wd)`` once, with weight decay), hence ``2 eps |p|`` for both sides; and the
    update's own arithmetic (the moments' multiply-adds, a square root, two divisions, the
    ``adam_eps`` addition, the step size's product: ten roundings at most), hence
    ``10 eps lr |u|``."""
    b1, b2 = betas
    step = state["step"]
    c1, c2 = 1 - b1**step, 1 - b2**step
    m0 = torch.zeros_like(state["exp_avg"].double()) if before is None else before["exp_avg"].double()
    v0 = torch.zeros_like(state["exp_avg_sq"].double()) if before is None else before["exp_avg_sq"].double()
    g = _gradient(state, b1, before)
    dg = gradient_tol(g, terms, norm_terms)
    a, b, c, d, e = b1 * m0 / c1, (1 - b1) / c1, b2 * v0 / c2, (1 - b2) / c2, adam_eps
    # u'(x) = 0 where b e sqrt(c + d x^2) = a d x - b c; squared: q2 x^2 + q1 x + q0 = 0.
    q2, q1, q0 = d * (a * a * d - b * b * e * e), -2 * a * b * c * d, b * b * c * (c - e * e)
    root = (q1 * q1 - 4 * q2 * q0).clamp(min=0).sqrt()
    linear = torch.where(q1 != 0, -q0 / torch.where(q1 != 0, q1, 1.0), g)  # where q2 = 0
    points = [g - dg, g + dg, g]
    for r in (
        (-q1 + root) / (2 * torch.where(q2 != 0, q2, 1.0)),
        (-q1 - root) / (2 * torch.where(q2 != 0, q2, 1.0)),
    ):
        r = torch.where(q2 != 0, r, linear)
        points.append(torch.where(torch.isfinite(r) & ((r - g).abs() <= dg), r, g))
    u = torch.stack([_adam_direction(x, a, b, c, d, e) for x in points])
    spread = u.max(0).values - u.min(0).values
    rounding = eps(param.dtype) * (2 * param.detach().double().abs() + 10 * lr * u.abs().max(0).values)
    return lr * spread + rounding


def assert_adam_close(
    got: Mapping[str, Tensor],
    want: Mapping[str, Tensor],
    states: Mapping[str, AdamState],
    lr: float,
    betas: tuple[float, float],
    adam_eps: float,
    terms: int,
    norm_terms: int = 0,
    before: Mapping[str, AdamState] | None = None,
) -> None:
    """Parameters after one AdamW step of two runs from the same parameters and optimizer state
    (``before``, ``adam_states`` of either run before the step; ``None`` for the first step): the
    same names, each within :func:`adam_atol` of ``want``'s (``states``: ``want``'s run's
    ``adam_states`` after it). A parameter without a state (never had a gradient) must be
    unchanged alike."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name, w in want.items():
        if name not in states:
            assert torch.equal(got[name], w), f"{name}: no optimizer state, yet the runs differ"
            continue
        start = None if before is None else before[name]
        atol = adam_atol(w, states[name], lr, betas, adam_eps, terms, norm_terms, start)
        assert_within(got[name], w, atol, name)

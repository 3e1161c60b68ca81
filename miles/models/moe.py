"""Sparse mixture-of-experts block: top-k router, experts, optional shared expert.

Routing is observable and replaceable through a ``RoutingHook`` so that the engine can record
the experts it chose and the trainer can replay them (rollout routing replay). Whatever experts
are used, the gate weights come from *this* forward's router probabilities, so the router keeps
receiving gradients under replay.

Parameter names follow the HF checkpoint layout: ``gate.weight``, ``experts.{e}.{gate,up,down}_proj.weight``,
``shared_expert.*`` and ``shared_expert_gate.weight`` (Qwen2-MoE).

Two expert implementations compute the same function (``SparseMoeBlock.expert_impl``):

- ``"reference"``: a Python loop over experts, three ``Linear`` modules each on the tokens routed
  to it. The ground truth, and the path of batch-invariant (true-on-policy) mode.
- ``"grouped"`` (default): the (token, slot) pairs sorted by expert, the expert weights stacked at
  compute time into ``[E, 2I, H]`` / ``[E, H, I]`` (parameters stay per expert, so checkpoints and
  FSDP see the HF layout), two grouped GEMMs (``torch._grouped_mm`` where it runs; one ``mm`` per
  expert segment otherwise), then a deterministic combine.

Under expert parallelism (``miles.train.expert_parallel``) a block holds only its rank's experts
and ``expert_dispatch`` computes the routed experts across ranks; routing (and any hook) still
runs first, on the rank's own tokens.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator, Sequence
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from miles.kernels import batch_invariant
from miles.models.layers import Linear, SwiGLUMLP
from miles.models.spec import ModelSpec


class RoutingHook(Protocol):
    """Sees (and may replace) every MoE layer's expert choice during one forward.

    ``route`` receives the layer index, the router logits ``[T, E]`` and the router's own top-k
    expert ids ``[T, k]``; it returns the ids to use (the same tensor to only observe).
    """

    def route(self, layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor: ...


def router_aux_loss(probs: torch.Tensor, used_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Load-balancing loss ``E * sum_e f_e * P_e`` (Switch Transformer, Fedus et al. 2021, eq. 4;
    the Qwen-MoE / Megatron ``aux_loss`` up to their top-k scaling).

    ``f_e``: fraction of the ``T * k`` (token, slot) assignments in ``used_ids`` ``[T, k]`` that go
    to expert ``e`` (no gradient); ``P_e``: mean over the ``T`` tokens of the router probability
    ``probs[:, e]`` ``[T, E]`` fp32. It is 1 under perfectly uniform routing.
    """
    counts = torch.bincount(used_ids.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / max(used_ids.numel(), 1)
    return num_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)^2`` in fp32 (ST-MoE, Zoph et al. 2022, eq. 5)."""
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


class RouterStats:
    """A ``RoutingHook`` that records the router losses and expert loads of one forward.

    It passes routing through to ``inner`` (e.g. a replay hook) unchanged, and each MoE block that
    gets it hands it its router logits, probabilities and the ids it actually used (the replayed
    ones under routing replay) through :meth:`observe`; the block's own computation is untouched.
    With ``losses``: ``aux[layer]`` / ``z[layer]`` (differentiable fp32 scalars, see
    :func:`router_aux_loss` / :func:`router_z_loss`); always: ``counts[layer]`` ``[E]`` (detached
    float) (token, slot) assignments per expert.

    After :meth:`end_forward`, calls come from activation-checkpoint recomputation in the backward:
    the same losses are computed again (recomputation must save the same tensors as the forward)
    but not recorded, so nothing is counted twice.

    :meth:`collect` makes it the active collector (a context variable) for
    :func:`miles.train.steps.packed_logprobs`, which then routes its forward through it.
    """

    def __init__(self, inner: RoutingHook | None = None, *, losses: bool = True) -> None:
        self.inner, self.losses, self.recording = inner, losses, True
        self.aux: dict[int, torch.Tensor] = {}
        self.z: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}

    @staticmethod
    def active() -> RouterStats | None:
        """The collector of the innermost :meth:`collect` block, if any."""
        return _ROUTER_STATS.get()

    @contextlib.contextmanager
    def collect(self) -> Iterator[RouterStats]:
        token = _ROUTER_STATS.set(self)
        try:
            yield self
        finally:
            _ROUTER_STATS.reset(token)

    def route(self, layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.inner is None:
            return topk_ids
        return self.inner.route(layer_idx, router_logits, topk_ids)

    def observe(
        self, layer_idx: int, router_logits: torch.Tensor, probs: torch.Tensor, used_ids: torch.Tensor
    ) -> None:
        if self.recording and layer_idx in self.counts:
            raise RuntimeError(f"MoE layer {layer_idx} was observed twice in one forward")
        num_experts = probs.shape[-1]
        ids = used_ids.detach().long()
        if self.losses:
            aux = router_aux_loss(probs, ids, num_experts)
            z = router_z_loss(router_logits)
            if self.recording:
                self.aux[layer_idx], self.z[layer_idx] = aux, z
        if self.recording:
            self.counts[layer_idx] = torch.bincount(ids.reshape(-1), minlength=num_experts).float()

    def end_forward(self) -> None:
        """The forward is done; later calls are recomputation (see the class docstring)."""
        end = getattr(self.inner, "end_forward", None)
        if end is not None:
            end()
        self.recording = False


_ROUTER_STATS: contextvars.ContextVar[RouterStats | None] = contextvars.ContextVar(
    "miles_router_stats", default=None
)


def select_experts(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32, then top-k. Returns ``(probs [T, E] fp32, topk_ids [T, k] int64)``."""
    if batch_invariant.enabled():
        probs = batch_invariant.rowwise(lambda r: F.softmax(r, dim=-1, dtype=torch.float32), router_logits)
    else:
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    _, topk_ids = torch.topk(probs, top_k, dim=-1)
    return probs, topk_ids


def gate_weights(probs: torch.Tensor, topk_ids: torch.Tensor, norm_topk_prob: bool) -> torch.Tensor:
    """Weights ``[T, k]`` fp32 of the chosen experts, renormalised to sum 1 if ``norm_topk_prob``."""
    weights = probs.gather(-1, topk_ids)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


# (device type, dtype) -> whether torch._grouped_mm runs there, probed once: older torch lacks it,
# early versions run it on sm90 only; torch 2.13 also on CPU and other GPUs (an mm per group).
_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        # On CUDA only bf16 reaches the CUTLASS kernel; other dtypes would take torch's own per-group
        # fallback, which is no better than ours.
        ok = hasattr(torch, "_grouped_mm") and (device.type != "cuda" or dtype == torch.bfloat16)
        if ok:
            try:
                a = torch.zeros(8, 8, device=device, dtype=dtype)
                offs = torch.tensor([3, 8], device=device, dtype=torch.int32)
                torch._grouped_mm(a, torch.zeros(2, 8, 8, device=device, dtype=dtype), offs=offs)
            except (RuntimeError, NotImplementedError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def grouped_linear(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ``ends[e-1]:ends[e]`` of ``a`` ``[M, K]`` times ``w[e]ᵀ`` (``w`` ``[E, N, K]``, the
    ``nn.Linear`` layout); ``ends`` int32 ``[E]`` cumulative with ``ends[-1] == M``. Returns ``[M, N]``."""
    # torch._grouped_mm wants 16-byte aligned row strides for its operands and for the gradients
    # autograd feeds it back (``[M, N]`` contiguous), hence K and N.
    align = 16 // a.element_size()
    if (
        a.shape[0]
        and a.shape[1] % align == 0
        and w.shape[1] % align == 0
        and _grouped_mm_runs(a.device, a.dtype)
    ):
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=ends)
    bounds = [0, *ends.tolist()]
    # unbind (not w[e]): its backward stacks the E gradients once instead of E full-size scatters.
    ws = torch.unbind(w)
    return torch.cat([F.linear(a[s:e], ws[i]) for i, (s, e) in enumerate(itertools.pairwise(bounds))])


def expert_ends(sorted_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 ``[E]``: ``ends[e]`` = number of entries of the sorted ``sorted_ids`` that are ``<= e``."""
    arange_e = torch.arange(num_experts, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.searchsorted(sorted_ids, arange_e, right=True, out_int32=True)


def grouped_expert_mlp(xs: torch.Tensor, ends: torch.Tensor, experts: Sequence[SwiGLUMLP]) -> torch.Tensor:
    """SwiGLU experts on rows sorted by expert: rows ``ends[e-1]:ends[e]`` of ``xs`` ``[n, H]`` go
    through ``experts[e]``; returns ``[n, H]`` in the same (sorted) order.

    The expert weights are stacked at compute time (parameters stay per expert, HF layout) and
    every expert gets a gradient, zeros for one without rows."""
    num_e, h = len(experts), xs.shape[1]
    inter = experts[0].gate_proj.weight.shape[0]
    # [E, 2I, H]: expert e's gate rows then its up rows, one GEMM for both (a single stack copy).
    gate_up = torch.stack([w for m in experts for w in (m.gate_proj.weight, m.up_proj.weight)])
    gate_up = gate_up.view(num_e, 2 * inter, h)
    down = torch.stack([m.down_proj.weight for m in experts])  # [E, H, I]
    if gate_up.requires_grad:
        # Every expert parameter gets a gradient through the stack (zeros for an expert with no
        # rows), so data-parallel ranks reduce the same set. Force those zeros: the Blackwell
        # grouped GEMM has written non-zero weight gradients for empty groups
        # (pytorch/pytorch#172439), and torch.where also keeps a NaN out.
        empty = (torch.diff(ends, prepend=ends.new_zeros(1)) == 0)[:, None, None]
        gate_up.register_hook(lambda g: torch.where(empty, 0, g))
        down.register_hook(lambda g: torch.where(empty, 0, g))
    gu = grouped_linear(xs, gate_up, ends)
    return grouped_linear(F.silu(gu[:, :inter]) * gu[:, inter:], down, ends)


def combine_slots(ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[:, j] * y[(t, j)]`` ``[T, H]``, where row ``i`` of ``ys`` ``[T*k, H]`` is the
    (token, slot) pair ``order[i]`` (flat index ``t * k + j``) and ``weights`` is ``[T, k]``."""
    t, k = weights.shape
    n = t * k
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
    # A fixed-order sum over the k slots of each token (no atomics).
    return (ys.index_select(0, inv).view(t, k, ys.shape[1]) * weights.unsqueeze(-1)).sum(dim=1)


class ExpertDispatch(Protocol):
    """Computes a block's routed experts elsewhere: expert parallelism
    (``miles.train.expert_parallel``) sends the (token, slot) rows to the ranks that own the
    experts and brings the results back. Same contract as ``SparseMoeBlock._experts``."""

    def __call__(
        self, block: SparseMoeBlock, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor: ...


class SparseMoeBlock(nn.Module):
    """``y = sum_k w_k * expert_{id_k}(x) [+ sigmoid(g(x)) * shared(x)]`` for ``x`` ``[T, hidden]``."""

    # Which expert computation runs; class-level so a test or benchmark can switch every layer.
    # Batch-invariant mode always takes the reference loop (see ``_experts``).
    expert_impl: Literal["grouped", "reference"] = "grouped"

    def __init__(self, spec: ModelSpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = spec.num_experts
        self.top_k = spec.num_experts_per_tok
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.top_k}) must be in [1, num_experts={self.num_experts}]"
            )
        self.norm_topk_prob = spec.norm_topk_prob
        self.gate = Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLUMLP(spec.hidden_size, spec.moe_intermediate_size) for _ in range(spec.num_experts)
        )
        self.shared_expert: SwiGLUMLP | None = None
        self.shared_expert_gate: Linear | None = None
        if spec.shared_expert_intermediate_size:
            self.shared_expert = SwiGLUMLP(spec.hidden_size, spec.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(spec.hidden_size, 1, bias=False)
        # Set by expert parallelism (then ``experts`` holds this rank's experts only).
        self.expert_dispatch: ExpertDispatch | None = None

    def forward(self, x: torch.Tensor, routing: RoutingHook | None = None) -> torch.Tensor:
        router_logits = self.gate(x)
        probs, topk_ids = select_experts(router_logits, self.top_k, self.norm_topk_prob)
        if routing is not None:
            topk_ids = routing.route(self.layer_idx, router_logits, topk_ids)
            if topk_ids.shape != (x.shape[0], self.top_k):
                raise ValueError(
                    f"layer {self.layer_idx}: routing hook returned ids of shape {tuple(topk_ids.shape)}, "
                    f"expected {(x.shape[0], self.top_k)}"
                )
        if isinstance(routing, RouterStats):
            routing.observe(self.layer_idx, router_logits, probs, topk_ids)
        weights = gate_weights(probs, topk_ids, self.norm_topk_prob).to(x.dtype)
        out = self._experts(x, topk_ids, weights)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def _experts(self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.expert_impl not in ("grouped", "reference"):
            raise ValueError(f"expert_impl must be 'grouped' or 'reference', got {self.expert_impl!r}")
        if self.expert_dispatch is not None:  # expert parallel: every rank takes part, always
            return self.expert_dispatch(self, x, topk_ids, weights)
        # Batch-invariant mode: the per-expert Linear runs fixed-shape row blocks, which is what
        # tests/kernels and the true-on-policy tests cover. Inference with fewer (token, slot)
        # pairs than experts (decode): the loop touches only the chosen experts' weights, while
        # stacking would copy all E of them for a handful of rows.
        if (
            self.expert_impl == "reference"
            or batch_invariant.enabled()
            or (not torch.is_grad_enabled() and topk_ids.numel() < self.num_experts)
        ):
            return self._experts_reference(x, topk_ids, weights)
        return self._experts_grouped(x, topk_ids, weights)

    def _experts_grouped(
        self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Same contract as :meth:`_experts_reference`: ``x`` ``[T, H]``, ``topk_ids`` ``[T, k]``,
        ``weights`` ``[T, k]`` in ``x.dtype``; returns ``sum_j weights[:, j] * expert_{ids[:, j]}(x)``."""
        t, k = topk_ids.shape
        n, h = t * k, x.shape[1]
        # Stable sort: row i of the sorted problem is (token order[i] // k, slot order[i] % k).
        sorted_ids, order = torch.sort(topk_ids.reshape(-1).long(), stable=True)
        ends = expert_ends(sorted_ids, self.num_experts)
        # (ids outside [0, E) never get here: gate_weights' gather rejects them.)
        # Dispatch by copy-then-permute rather than gathering token rows k times: the backward is
        # then a permutation scatter plus a sum over k, deterministic on every device (a gather
        # with repeated indices backpropagates through index_add, atomic on CUDA).
        xs = x.unsqueeze(1).expand(t, k, h).reshape(n, h).index_select(0, order)
        ys = grouped_expert_mlp(xs, ends, list(self.experts))  # type: ignore[arg-type]
        return combine_slots(ys, order, weights)

    def _experts_reference(
        self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Per-expert loop over the tokens routed to it: the ground truth for faster kernels."""
        out = torch.zeros_like(x)
        # With autograd on, every expert runs (on zero tokens if none were routed to it) so each has
        # a gradient, zero or not: data-parallel ranks must reduce the same set of gradients.
        experts = range(self.num_experts) if torch.is_grad_enabled() else torch.unique(topk_ids).tolist()
        for e in experts:
            token_idx, slot = torch.where(topk_ids == e)
            y = self.experts[e](x[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

"""Expert parallelism (EP) in the trainer: the experts of each MoE layer sharded across ranks.

Layout over ``W`` ranks with EP size ``N`` (``W % N == 0``, ``num_experts % N == 0``): a 2-D
mesh ``(dp, ep) = (W / N, N)``, consecutive ranks in one EP group (the all-to-all stays within
a node first). EP rank ``r`` owns experts ``[r * E/N, (r + 1) * E/N)`` of every MoE layer, in a
:class:`LocalExperts` container that keeps their HF names (``mlp.experts.{e}.*`` with global
``e``), so checkpoints and weight export see the same FQNs as the unsharded model.

- The router, attention, norms, embeddings and shared experts are FSDP2-sharded over all ``W``
  ranks, as without EP; each ``LocalExperts`` is FSDP2-sharded over the ``dp`` dimension (the
  ``W / N`` ranks owning the same experts), with gradient divide factor ``W`` (below).
- Forward of a block (:class:`ExpertParallel`): routing runs first, on the rank's own tokens
  (so R2/R3 replay hooks are unchanged); the (token, slot) rows are sorted by expert, sent to
  the owning ranks with ``all_to_all_single`` (counts exchanged first), computed there by a
  grouped GEMM over the local experts, sent back and combined with the gate weights in a fixed
  order. The all-to-all is an autograd function whose backward is the reverse all-to-all, so
  gradients are exact. Every rank of an EP group must run the same forwards (the trainer's
  aligned micro-batches already guarantee it for FSDP).
- Gradients: the trainer scales each rank's loss by ``W`` (FSDP averages). An expert's gradient
  holds the contributions of the ``N`` ranks of its EP group (through the all-to-all backward)
  and the reduce-scatter over ``dp`` sums the ``W / N`` groups: dividing by ``W`` gives the
  global-batch gradient, as for dense parameters.
- The gradient norm (:func:`global_grad_norm`, used by :func:`miles.train.steps.clipped_step`)
  sums the squares of the dense DTensors (one mesh) and of each rank's experts (another mesh)
  summed over the EP group.

gloo (CPU) and NCCL both implement ``all_to_all_single`` in torch >= 2.11.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from miles.models import CausalLM
from miles.models.layers import SwiGLUMLP
from miles.models.moe import SparseMoeBlock, combine_slots, expert_ends, grouped_expert_mlp

_EP_ATTR = "_miles_expert_parallel"


@dataclass(frozen=True)
class ExpertParallelLayout:
    """Where a model's experts live: ``ep_size`` ranks per EP group, this rank's EP index
    ``ep_rank``, ``group`` its EP process group and ``dp_mesh`` the mesh its experts are
    FSDP-sharded over (ranks holding the same experts)."""

    ep_size: int
    ep_rank: int
    group: Any  # dist.ProcessGroup
    dp_mesh: Any  # DeviceMesh


def layout(model: nn.Module) -> ExpertParallelLayout | None:
    """The model's EP layout, or ``None`` when its experts are not sharded."""
    return getattr(model, _EP_ATTR, None)


class LocalExperts(nn.Module):
    """This rank's experts of one MoE layer, registered under their global index (``"4"``,
    ``"5"``...), so parameter names stay ``mlp.experts.{e}.*``.

    ``forward(xs, ends)``: rows sorted by local expert (``ends`` int32 ``[E_local]`` cumulative),
    see :func:`~miles.models.moe.grouped_expert_mlp`. A plain module with a forward (not a
    ``ModuleDict``: torch 2.11's ``fully_shard`` refuses every ``ModuleDict``, forward or not), so
    FSDP2 gathers the experts around it."""

    def __init__(self, experts: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, expert in experts.items():
            self.add_module(name, expert)

    def values(self) -> list[nn.Module]:
        return list(self.children())

    def __iter__(self) -> Iterator[str]:
        """The global expert ids this rank holds, as strings (``ModuleDict``-like)."""
        return iter(name for name, _ in self.named_children())

    def forward(self, xs: Tensor, ends: Tensor) -> Tensor:
        experts: list[SwiGLUMLP] = self.values()  # type: ignore[assignment]
        return grouped_expert_mlp(xs, ends, experts)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows; backward: the reverse exchange of the gradient rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class ExpertParallel:
    """The ``expert_dispatch`` of one EP-sharded :class:`SparseMoeBlock` (module docstring)."""

    def __init__(self, lay: ExpertParallelLayout, num_experts: int) -> None:
        self.layout, self.num_experts = lay, num_experts
        self.num_local = num_experts // lay.ep_size
        self.first = lay.ep_rank * self.num_local

    def __call__(self, block: SparseMoeBlock, x: Tensor, topk_ids: Tensor, weights: Tensor) -> Tensor:
        t, k = topk_ids.shape
        group, n_ep = self.layout.group, self.layout.ep_size
        sorted_ids, order = torch.sort(topk_ids.reshape(-1).long(), stable=True)
        # Experts are contiguous per rank, so the sorted rows are already grouped by destination.
        send = torch.bincount(sorted_ids // self.num_local, minlength=n_ep)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        in_splits, out_splits = send.tolist(), recv.tolist()
        xs = x.unsqueeze(1).expand(t, k, x.shape[1]).reshape(t * k, -1).index_select(0, order)
        recv_x = _AllToAll.apply(xs, out_splits, in_splits, group)
        recv_ids = _exchange(sorted_ids, out_splits, in_splits, group) - self.first
        # Each source's rows are sorted; a stable sort groups all sources' rows by local expert.
        local_sorted, local_order = torch.sort(recv_ids, stable=True)
        ends = expert_ends(local_sorted, self.num_local)
        ys = block.experts(recv_x.index_select(0, local_order), ends)
        inv = torch.empty_like(local_order).scatter_(
            0, local_order, torch.arange(local_order.numel(), device=x.device)
        )
        back = _AllToAll.apply(ys.index_select(0, inv), in_splits, out_splits, group)
        return combine_slots(back, order, weights)


def moe_blocks(model: CausalLM) -> list[SparseMoeBlock]:
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)]


def shard_experts(model: CausalLM, lay: ExpertParallelLayout) -> None:
    """Keep only this EP rank's experts in every MoE block and route its forward through
    :class:`ExpertParallel`. Before FSDP; in place."""
    if not model.spec.is_moe:
        raise ValueError("expert parallelism needs an MoE model")
    for block in moe_blocks(model):
        e = block.num_experts
        if e % lay.ep_size:
            raise ValueError(
                f"expert_parallel_size {lay.ep_size} must divide num_experts {e} (layer {block.layer_idx})"
            )
        per = e // lay.ep_size
        mine = range(lay.ep_rank * per, (lay.ep_rank + 1) * per)
        block.experts = LocalExperts({str(i): block.experts[i] for i in mine})  # type: ignore[assignment]
        block.expert_dispatch = ExpertParallel(lay, e)
    setattr(model, _EP_ATTR, lay)


def _local_experts(block: SparseMoeBlock) -> LocalExperts:
    experts: nn.Module = block.experts
    if not isinstance(experts, LocalExperts):
        raise TypeError(f"layer {block.layer_idx}: the experts are not expert-parallel")
    return experts


def _expert_param_ids(model: CausalLM) -> set[int]:
    return {id(p) for block in moe_blocks(model) for p in block.experts.parameters()}


def global_grad_norm(model: CausalLM) -> Tensor:
    """The 2-norm of every gradient of the model over all ranks, each expert counted once.

    Collective. Dense and expert gradients live on different meshes under EP, which
    ``torch.nn.utils.get_total_norm`` cannot mix: each part's norm is taken on its own mesh."""
    lay = layout(model)
    expert_ids = _expert_param_ids(model) if lay is not None else set()
    dense = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in expert_ids]
    experts = [p.grad for p in model.parameters() if p.grad is not None and id(p) in expert_ids]
    device = model.lm_head.weight.device
    dense_sq = _sq_norm(dense) if dense else torch.zeros((), device=device)
    expert_sq = _sq_norm(experts) if experts else torch.zeros((), device=device)
    if lay is not None:
        dist.all_reduce(expert_sq, group=lay.group)  # each EP rank holds other experts
    return (dense_sq + expert_sq).sqrt()


def _sq_norm(grads: list[Tensor]) -> Tensor:
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    full = getattr(norm, "full_tensor", None)  # a DTensor norm -> the norm over all its shards
    return (full() if full is not None else norm).float().square()


def _full(t: Tensor) -> Tensor:
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t  # a DTensor shard -> the whole tensor (collective)


def _expert_prefix(name: str, blocks: dict[str, SparseMoeBlock]) -> str | None:
    for prefix in blocks:
        if name.startswith(prefix):
            return prefix
    return None


def full_state_names(model: nn.Module) -> list[str]:
    """The names of the unsharded model's ``state_dict``, in its order (all experts under EP)."""
    return [name for name, _ in _walk(model, gather=False)]


def full_state_items(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, full tensor)`` of the unsharded model's ``state_dict``, in its order: FSDP shards
    gathered, and under EP every expert of a layer gathered from its EP rank when the walk
    reaches the layer (one layer's experts alive at a time). Collective: every rank iterates to
    the end, in step, and receives the same tensors."""
    yield from ((name, t) for name, t in _walk(model, gather=True) if t is not None)


def _walk(model: nn.Module, *, gather: bool) -> Iterator[tuple[str, Tensor | None]]:
    lay = layout(model)
    state = model.state_dict()
    if lay is None:
        for name, value in state.items():
            yield name, _full(value.detach()) if gather else None
        return
    assert isinstance(model, CausalLM)  # only shard_experts sets a layout
    blocks = {f"model.layers.{b.layer_idx}.mlp.experts.": b for b in moe_blocks(model)}
    done: set[str] = set()
    for name, value in state.items():
        prefix = _expert_prefix(name, blocks)
        if prefix is None:
            yield name, _full(value.detach()) if gather else None
        elif prefix not in done:
            done.add(prefix)
            yield from _layer_experts(prefix, blocks[prefix], lay, gather)


def _layer_experts(
    prefix: str, block: SparseMoeBlock, lay: ExpertParallelLayout, gather: bool
) -> Iterator[tuple[str, Tensor | None]]:
    local = list(_local_experts(block).values())
    subnames = list(local[0].state_dict())
    stacked: dict[str, Tensor] = {}
    if gather:
        for sub in subnames:
            mine = torch.stack([_full(m.state_dict()[sub].detach()) for m in local])
            parts = [torch.empty_like(mine) for _ in range(lay.ep_size)]
            dist.all_gather(parts, mine, group=lay.group)
            stacked[sub] = torch.cat(parts)
    for e in range(block.num_experts):
        for sub in subnames:
            yield f"{prefix}{e}.{sub}", stacked[sub][e] if gather else None


def global_param_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``{name: global shape}`` of the unsharded model's parameters (every expert under EP)."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    lay = layout(model)
    if lay is None or not isinstance(model, CausalLM):
        return shapes
    out: dict[str, list[int]] = {}
    for block in moe_blocks(model):
        prefix = f"model.layers.{block.layer_idx}.mlp.experts."
        local = next(iter(_local_experts(block).values()))
        for e in range(block.num_experts):
            for sub, p in local.named_parameters():
                out[f"{prefix}{e}.{sub}"] = list(p.shape)
    return {**shapes, **out}

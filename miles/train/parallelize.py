"""Apply parallelism to a shared ``CausalLM`` from the outside: FSDP2 and activation checkpointing.

The model files know nothing of either (DESIGN.md §4). Layout under FSDP2:

- one FSDP unit per decoder layer (``model.model.layers[i]``): its parameters are all-gathered
  just before the layer runs and freed after, so peak memory holds one full layer at a time;
- the root unit (the whole ``CausalLM``) owns everything else: ``embed_tokens``, the final
  ``norm`` and ``lm_head``. Tied embeddings (``lm_head.weight is embed_tokens.weight``) are one
  parameter of one unit, so the tie survives sharding. FSDP2 keeps the root's parameters
  unsharded between forward and backward, which is what lets the trainer apply ``lm_head``
  outside ``forward`` (chunked log-probs).

Expert parallelism (``expert_parallel_size=N``, :mod:`miles.train.expert_parallel`): each MoE
layer's experts are split over the ``N`` ranks of an EP group and FSDP2-sharded over the other
mesh dimension; everything else is sharded over all ranks as above.

Mixed precision on CUDA: parameters stay fp32 (the optimizer's master copy), compute runs in
``param_dtype`` (bf16) and gradients are reduce-scattered in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from miles.models import CausalLM

_CHECKPOINTED = "_miles_activation_checkpointing"


def apply_activation_checkpointing(model: CausalLM) -> None:
    """Recompute each decoder layer's activations in the backward instead of storing them.

    Wraps each layer's ``forward`` in ``torch.utils.checkpoint`` (non-reentrant) on the instance,
    so parameter names and ``state_dict`` keys are unchanged (no wrapper module). Idempotent.
    Values and gradients are identical to the plain model: the recompute runs the same ops.
    """
    for layer in model.model.layers:
        if getattr(layer, _CHECKPOINTED, False):
            continue
        inner: Callable[..., Any] = layer.forward

        @functools.wraps(inner)
        def forward(*args: Any, __inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
            return checkpoint(__inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        setattr(layer, _CHECKPOINTED, True)


def default_mesh(device: torch.device | str) -> Any:
    """A 1-D data-parallel device mesh over the default process group (which must be initialised)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("FSDP2 needs torch.distributed: call init_process_group first")
    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


def parallelize(
    model: CausalLM,
    *,
    mesh: Any = None,
    fsdp: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    expert_parallel_size: int = 1,
) -> CausalLM:
    """Shard ``model`` with FSDP2 over ``mesh`` and optionally checkpoint activations; returns it.

    - ``mesh``: a 1-D ``DeviceMesh``; ``None`` builds one over the default process group
      (:func:`default_mesh`) on the model's device type (gloo on CPU, NCCL on CUDA).
    - ``fsdp=False`` only applies activation checkpointing (single process, no process group).
    - ``param_dtype``: compute dtype under FSDP mixed precision (``torch.bfloat16`` on GPU);
      ``None`` computes in the stored dtype. ``reduce_dtype``: gradient reduce-scatter dtype.
    - ``reshard_after_forward``: free each layer's gathered parameters after its forward (ZeRO-3);
      ``False`` keeps them until the backward (ZeRO-2 like, more memory, less communication).

    - ``expert_parallel_size``: ``N > 1`` keeps ``num_experts / N`` experts of each MoE layer on
      each rank (all-to-all token exchange over groups of ``N`` consecutive ranks of the default
      process group, whose size ``N`` must divide); needs ``fsdp`` and ``mesh=None``.

    The model's parameters become ``DTensor`` shards (dim 0) after this call; build the
    optimizer afterwards.
    """
    if expert_parallel_size < 1:
        raise ValueError(f"expert_parallel_size must be >= 1, got {expert_parallel_size}")
    if expert_parallel_size > 1 and (not fsdp or mesh is not None):
        raise ValueError("expert_parallel_size > 1 needs fsdp=True and mesh=None (it builds its meshes)")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if not fsdp:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        mesh = default_mesh(model.device)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if expert_parallel_size > 1:
        _shard_experts(model, expert_parallel_size, mp, reshard_after_forward)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root gathers embed_tokens / norm / lm_head (tied or not) as one unit, and keeps them
    # gathered after the forward: the trainer applies lm_head to the hidden states outside
    # ``forward`` (chunked log-probs), and the backward needs them again at once anyway.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def _shard_experts(model: CausalLM, ep_size: int, mp: Any, reshard_after_forward: bool) -> None:
    """Split the experts over EP groups, then FSDP2-shard each layer's local experts over the
    ranks that hold the same ones, dividing their gradients by the world size (see
    :mod:`miles.train.expert_parallel`: each rank's loss is scaled by the world size)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from miles.train.expert_parallel import ExpertParallelLayout, moe_blocks, shard_experts

    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"expert_parallel_size {ep_size} must divide the number of ranks {world}")
    mesh2d = init_device_mesh(model.device.type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
    lay = ExpertParallelLayout(ep_size, mesh2d["ep"].get_local_rank(), mesh2d["ep"].get_group(), mesh2d["dp"])
    shard_experts(model, lay)
    for block in moe_blocks(model):
        experts: Any = fully_shard(
            block.experts, mesh=lay.dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward
        )
        experts.set_gradient_divide_factor(float(world))


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` itself."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)

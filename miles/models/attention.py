"""The attention-backend interface between the shared models and whoever runs them.

A model never owns a KV cache or knows how its tokens are laid out. Each forward receives an
``AttentionContext`` that does. The trainer passes a :class:`VarlenContext` (packed sequences,
no cache); the engine passes a context over its paged KV cache that stores the new keys and
values and attends over each request's cached prefix. Both implement one method, ``attend``.
"""

from __future__ import annotations

import itertools
import logging
from typing import Protocol, runtime_checkable

import torch

from miles.kernels import batch_invariant
from miles.kernels.attention import (
    disable_flash_varlen,
    flash_varlen_causal_attention,
    flash_varlen_supported,
    padded_varlen_causal_attention,
    padded_varlen_plan,
    varlen_causal_attention,
)

log = logging.getLogger(__name__)


@runtime_checkable
class AttentionContext(Protocol):
    """Lays out the ``T`` tokens of one forward and computes attention for each layer.

    ``attend`` is called once per layer, in layer order, with the rotated queries and keys of the
    forward's tokens: ``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]``. It returns ``[T, Hq, D]``.
    A cache-backed context stores ``k``/``v`` before attending.
    """

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor: ...


class VarlenContext:
    """Packed variable-length sequences with no cache: the trainer's path.

    ``cu_seqlens`` int ``[B + 1]`` gives the sequence boundaries within the ``T`` packed tokens.
    """

    def __init__(self, cu_seqlens: torch.Tensor) -> None:
        # One host read of the boundaries per forward (a device sync for a CUDA tensor), checked
        # on the host: not one read per layer, nor one per check.
        bounds: list[int] = cu_seqlens.tolist() if cu_seqlens.dim() == 1 else []
        if len(bounds) < 2 or bounds[0] != 0:
            raise ValueError(
                f"cu_seqlens must be 1-D, start at 0 and have >= 2 entries, got {cu_seqlens.tolist()}"
            )
        if any(b < a for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
        self.cu_seqlens = cu_seqlens
        self.bounds = bounds
        self.max_len = max((b - a for a, b in itertools.pairwise(self.bounds)), default=0)
        self._padded_plan: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def single(cls, length: int, device: torch.device | str = "cpu") -> VarlenContext:
        return cls(torch.tensor([0, length], dtype=torch.int32, device=device))

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        if self.bounds[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens covers {self.bounds[-1]} tokens but the forward has {q.shape[0]}")
        if batch_invariant.enabled():
            return batch_invariant.varlen_causal_attention(q, k, v, self.cu_seqlens, scale)
        if flash_varlen_supported(q, k):
            try:
                return flash_varlen_causal_attention(q, k, v, self.cu_seqlens, self.max_len, scale)
            except RuntimeError as e:  # a torch built without the flash kernels: pad instead
                disable_flash_varlen(f"{type(e).__name__}: {e}")
                log.warning("varlen flash attention failed (%s); padding sequences for SDPA instead", e)
        if q.is_cuda:
            # One SDPA call over the padded sequences instead of a Python loop of per-sequence
            # calls (the trainer's attention was most of its host time on a GPU).
            if self._padded_plan is None:
                self._padded_plan = padded_varlen_plan(self.bounds, q.device)
            return padded_varlen_causal_attention(q, k, v, self._padded_plan, scale)
        return varlen_causal_attention(q, k, v, self.cu_seqlens, scale)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions ``[T]`` restarting at 0 for every packed sequence."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    total = int(lengths.sum())
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.arange(total, device=cu_seqlens.device) - starts

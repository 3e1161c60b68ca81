"""Per-sequence reductions over packed token tensors.

Packed layout (DESIGN.md §6, ``miles.types.TrainBatch``): B sequences are concatenated into one
1-D tensor of T tokens, no padding; ``cu_seqlens`` (int, ``[B + 1]``, ``cu_seqlens[0] == 0``,
non-decreasing, ``cu_seqlens[-1] == T``) gives the boundaries: sequence ``i`` is
``x[cu_seqlens[i]:cu_seqlens[i + 1]]``. Empty sequences are allowed.

Reductions go through a padded ``[B, L_max]`` view rather than ``index_add``/``scatter_add``:
those use atomics on CUDA, so their float sums depend on thread timing, while a padded row sum is
deterministic and accurate (a global cumsum difference would lose precision for long batches).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def check_cu_seqlens(cu_seqlens: Tensor, num_tokens: int) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` is a valid packing of ``num_tokens`` tokens."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D with B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={num_tokens}, got {cu[0]}..{cu[-1]}")
    if any(b < a for a, b in itertools.pairwise(cu)):
        raise ValueError("cu_seqlens must be non-decreasing")


def seq_lengths(cu_seqlens: Tensor) -> Tensor:
    """Lengths of the packed sequences, int64 ``[B]``."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def segment_ids(cu_seqlens: Tensor, device: torch.device | None = None) -> Tensor:
    """Sequence index of every token, int64 ``[T]`` (``[0, 0, 0, 1, 1, 2, ...]``)."""
    lengths = seq_lengths(cu_seqlens)
    ids = torch.arange(lengths.numel(), device=lengths.device)
    out = torch.repeat_interleave(ids, lengths)
    return out if device is None else out.to(device)


def _pad_index(cu_seqlens: Tensor, device: torch.device) -> tuple[Tensor, Tensor, int, int]:
    """(row, column) of every token in the padded view, plus B and L_max."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    num_seqs = int(lengths.numel())
    max_len = int(lengths.max()) if num_seqs > 0 else 0
    rows = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths)
    cols = torch.arange(rows.numel(), device=device) - cu[rows]
    return rows, cols, num_seqs, max_len


def pad_segments(x: Tensor, cu_seqlens: Tensor, fill: float = 0.0) -> Tensor:
    """Packed ``[T, ...]`` -> padded ``[B, L_max, ...]`` (``fill`` past each sequence's end). Differentiable."""
    rows, cols, num_seqs, max_len = _pad_index(cu_seqlens, x.device)
    out = x.new_full((num_seqs, max_len, *x.shape[1:]), fill)
    # Out-of-place index_put: the (row, col) pairs are unique, so this is deterministic.
    return out.index_put((rows, cols), x)


def unpad_segments(padded: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Padded ``[B, L_max, ...]`` -> packed ``[T, ...]``; inverse of :func:`pad_segments`."""
    rows, cols, _, _ = _pad_index(cu_seqlens, padded.device)
    return padded[rows, cols]


def segment_sum(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Per-sequence sum: ``out[i] = sum(x[cu[i]:cu[i+1]])``; ``[T] -> [B]`` (0 for empty sequences)."""
    return pad_segments(x, cu_seqlens).sum(dim=1)


def segment_max(x: Tensor, cu_seqlens: Tensor, empty: float = float("-inf")) -> Tensor:
    """Per-sequence max, ``[T] -> [B]``; ``empty`` for empty sequences."""
    padded = pad_segments(x, cu_seqlens, fill=float("-inf"))
    if padded.shape[1] == 0:
        return x.new_full((padded.shape[0],), empty)
    out = padded.max(dim=1).values
    lengths = seq_lengths(cu_seqlens).to(x.device)
    return torch.where(lengths > 0, out, torch.full_like(out, empty))


def segment_masked_mean(x: Tensor, mask: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Per-sequence mean of ``x`` over tokens where ``mask`` is 1: ``sum(x*m) / max(sum(m), 1)``; ``[T] -> [B]``.

    A sequence with no masked token gets 0.
    """
    mask = mask.to(x.dtype)
    return segment_sum(masked(x, mask), cu_seqlens) / segment_sum(mask, cu_seqlens).clamp(min=1)


def masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask``, but exactly 0 where ``mask == 0`` even if ``x`` is inf/NaN there (untrained
    positions may hold garbage, e.g. log-probs of prompt tokens); the gradient there is 0."""
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def expand_to_tokens(per_seq: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Broadcast a per-sequence value to its tokens: ``[B] -> [T]``. Differentiable."""
    lengths = seq_lengths(cu_seqlens).to(per_seq.device)
    return torch.repeat_interleave(per_seq, lengths, dim=0)


def last_masked_index(mask: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Global token index of each sequence's last token with ``mask == 1``, int64 ``[B]``; -1 if none."""
    positions = torch.arange(mask.numel(), device=mask.device, dtype=torch.float64)
    marked = torch.where(mask > 0, positions, torch.full_like(positions, -1.0))
    return segment_max(marked, cu_seqlens, empty=-1.0).long()


def _forward_discounted_scan(x: Tensor, w: float, chunk: int) -> Tensor:
    """``y[:, t] = x[:, t] + w * y[:, t - 1]`` along dim 1 of ``[B, L]``, in O(L / chunk) Python steps.

    Inside a chunk the recurrence is a matmul with ``M[i, j] = w**(j - i)`` (j >= i); the carry
    between chunks enters as ``w**(j + 1) * carry``. Powers never exceed ``chunk``, so this stays
    finite for any ``0 <= w <= 1`` (a global ``w**-t`` rescaling would overflow).
    """
    num_rows, length = x.shape
    pad = (-length) % chunk
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    idx = torch.arange(chunk, device=x.device)
    diff = idx[None, :] - idx[:, None]
    base = torch.tensor(w, dtype=x.dtype, device=x.device)
    mat = torch.where(
        diff >= 0, base ** diff.clamp(min=0).to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device)
    )
    carry_pow = base ** torch.arange(1, chunk + 1, device=x.device, dtype=x.dtype)
    local = (x.view(num_rows, -1, chunk) @ mat).view(num_rows, -1)
    out = torch.empty_like(local)
    carry = x.new_zeros(num_rows)
    for start in range(0, local.shape[1], chunk):
        block = local[:, start : start + chunk] + carry[:, None] * carry_pow
        out[:, start : start + chunk] = block
        carry = block[:, -1]
    return out[:, :length]


def segment_discounted_cumsum(x: Tensor, cu_seqlens: Tensor, discount: float, chunk: int = 128) -> Tensor:
    """Reverse discounted cumulative sum inside each sequence: ``y_t = x_t + discount * y_{t+1}``.

    The recursion restarts at each sequence end (``y`` past the end is 0). ``[T] -> [T]``, computed
    in float64 and returned in ``x``'s dtype. Used for discounted returns (REINFORCE++) and GAE.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    padded = pad_segments(x.detach().double(), cu_seqlens)
    if padded.numel() == 0:
        return x.detach().clone()
    # Zeros past each end are harmless: they add nothing to the reverse recursion.
    scanned = _forward_discounted_scan(padded.flip(1), discount, chunk).flip(1)
    return unpad_segments(scanned, cu_seqlens).to(x.dtype)

"""Weight export, the trainer's side of the weight path: the policy's full, HF-named tensors in
size-bounded buckets, for the engines (moved by ``miles.orchestrate``) and for ``--save-hf``.

:func:`iter_weight_buckets` walks ``model.state_dict()`` (whose names are the HF names: the
shared model uses them, DESIGN.md §4) and yields lists of ``(name, tensor)``:

- FSDP2 shards (DTensor) are gathered with ``full_tensor()``: a collective, so **every rank must
  iterate the generator to the end**, in step. Every rank receives the same buckets; the rank
  that talks to the engine sends them, the others drop them. (Yielding on rank 0 only would save
  nothing: the gather is an all-gather either way.)
- Tensors are cast to ``dtype`` (what the engine serves in) on the model's device.
- Each bucket holds at most ``bucket_bytes`` bytes; a tensor larger than that gets a bucket of
  its own. Only one bucket's gathered tensors are alive at a time.
- Under expert parallelism each rank holds some experts only: every expert of a layer is
  gathered from its EP rank when the walk reaches that layer (:func:`~miles.train.expert_parallel.full_state_items`),
  so the names and order are the unsharded model's.
- A tied ``lm_head.weight`` (the same tensor as ``model.embed_tokens.weight``) is not sent: the
  engine re-ties it, as ``from_pretrained`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from miles.train.expert_parallel import full_state_items, full_state_names


def _is_tied(model: nn.Module, name: str) -> bool:
    spec = getattr(model, "spec", None)
    return name == "lm_head.weight" and bool(getattr(spec, "tie_word_embeddings", False))


def weight_names(model: nn.Module) -> list[str]:
    """The names :func:`iter_weight_buckets` yields, in order."""
    return [n for n in full_state_names(model) if not _is_tied(model, n)]


@torch.no_grad()
def iter_weight_buckets(
    model: nn.Module, dtype: torch.dtype | None, bucket_bytes: int
) -> Iterator[list[tuple[str, Tensor]]]:
    """Buckets of full HF-named tensors in ``dtype`` (None: as stored), each at most
    ``bucket_bytes`` bytes unless a single tensor is larger. Collective under FSDP (module
    docstring); the tensors are fresh copies when cast or gathered, else detached views."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, t in full_state_items(model):
        if _is_tied(model, name):
            continue
        if dtype is not None:
            t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def save_trainer_hf(
    model: nn.Module, out_dir: str | Path, *, tokenizer_source: str | Path | None, write: bool = True
) -> None:
    """Export the trainer's policy as a Hugging Face directory, sharded or not (FSDP2, EP).

    Collective like :func:`iter_weight_buckets`: every rank calls it; the ranks with ``write``
    (rank 0) write the gathered fp32 master tensors through :func:`miles.models.loading.save_hf`."""
    from miles.models.loading import save_hf

    tensors: dict[str, Tensor] = {}
    for bucket in iter_weight_buckets(model, None, 1 << 30):
        if write:
            tensors.update((n, t.to("cpu")) for n, t in bucket)
    if write:
        save_hf(model, out_dir, tokenizer_source=tokenizer_source, tensors=tensors)  # type: ignore[arg-type]

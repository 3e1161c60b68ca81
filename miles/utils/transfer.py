"""Host <-> device copies that do not stop the host until it needs the data.

On CUDA, a ``tensor.to("cuda")`` from ordinary (pageable) host memory copies and then waits for
the whole stream, i.e. for every kernel queued before it; so does ``.tolist()`` on a device
tensor. A decode step made several such copies, so the host could never run ahead of the GPU
(the overlapped schedule in ``miles.engine.overlap`` needs it to). Here host data goes through
pinned memory with ``non_blocking`` copies (small ones through a reused ring of pinned slots,
:class:`PinnedRing`; larger ones through PyTorch's caching host allocator, which keeps a pinned
block alive until its copy has run), and device data comes back into pinned memory with an
event the reader waits on. On the CPU both are plain tensor operations. The engine's decode
steps and the trainer's micro-batch gathers both use them.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class PinnedRing:
    """Pinned host memory for small host-to-device copies, reused round-robin.

    Each copy is staged in the next slot and queued ``non_blocking``; an event recorded after it
    guards the slot, and the slot is written again only once that event has passed (with
    ``slots`` slots and a few copies per decode step, it has, long before). This replaces a
    ``pin_memory()`` per copy: PyTorch's caching host allocator took a lock and polled the
    events of every block in flight on each call, a large share of the engine thread's time in
    a GRPO rollout (docs/performance.md, "Engine (rollout)"). Thread-safe; data larger than a
    slot is not staged here.
    """

    def __init__(self, slots: int = 64, slot_bytes: int = 1 << 17) -> None:
        self.slot_bytes = slot_bytes
        self.buf = torch.empty(slots * slot_bytes, dtype=torch.uint8, pin_memory=True)
        self.events: list[Any] = [None] * slots
        self.next = 0
        self.lock = threading.Lock()

    def copy(
        self, host: torch.Tensor, device: torch.device, dst: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``host`` (contiguous, on the CPU) on ``device`` (into ``dst`` if given), queued without a
        wait; ``None`` when it does not fit a slot (the caller copies it another way)."""
        nbytes = host.numel() * host.element_size()
        if nbytes > self.slot_bytes or not host.is_contiguous():
            return None
        with self.lock:
            i = self.next
            self.next = (i + 1) % len(self.events)
            if self.events[i] is not None:
                self.events[i].synchronize()
            staged = (
                self.buf[i * self.slot_bytes : i * self.slot_bytes + nbytes].view(host.dtype).view(host.shape)
            )
            staged.copy_(host)
            if dst is None:
                out = staged.to(device, non_blocking=True)
            else:
                out = dst.copy_(staged, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self.events[i] = event
        return out


@functools.cache
def _ring() -> PinnedRing:
    """The process's ring, made on the first CUDA copy (pinned memory needs CUDA)."""
    return PinnedRing()


def to_device(
    data: torch.Tensor | np.ndarray | Sequence[Any], device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """``data`` (a host tensor, a numpy array or a list) on ``device``, queued without a wait."""
    if isinstance(data, torch.Tensor):
        if data.device == device or data.device.type != "cpu":
            return data.to(device)  # already there, or a device-to-device copy (no host wait)
        host = data
    elif isinstance(data, np.ndarray):
        host = torch.from_numpy(data)
    else:
        host = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    staged = _ring().copy(host, device)
    return staged if staged is not None else host.pin_memory().to(device, non_blocking=True)


def copy_to(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a host ``src``, queued without a wait when ``dst`` is on CUDA."""
    if dst.device.type == "cuda":
        if _ring().copy(src, dst.device, dst) is None:
            dst.copy_(src.pin_memory(), non_blocking=True)
    else:
        dst.copy_(src)


class HostCopy:
    """A device tensor's copy on the host, started now and read with :meth:`wait`.

    The copy is queued on the current stream behind the work that produces the tensor; ``wait``
    blocks until that work and the copy are done (on the CPU it returns at once).
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event: Any = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.detach().clone()

    def ready(self) -> bool:
        """Whether :meth:`wait` would return without blocking."""
        return self.event is None or bool(self.event.query())

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host

"""Host <-> device copies that do not stop the host until it needs the data.

On CUDA, a ``tensor.to("cuda")`` from ordinary (pageable) host memory copies and then waits for
the whole stream, i.e. for every kernel queued before it; so does ``.tolist()`` on a device
tensor. A decode step made several such copies, so the host could never run ahead of the GPU
(the overlapped schedule in ``miles.engine.overlap`` needs it to). Here host data goes through
pinned memory with ``non_blocking`` copies (PyTorch's caching host allocator keeps a pinned
block alive until its copy has run), and device data comes back into pinned memory with an
event the reader waits on. On the CPU both are plain tensor operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


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
    return host.pin_memory().to(device, non_blocking=True)


def copy_to(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a host ``src``, queued without a wait when ``dst`` is on CUDA."""
    if dst.device.type == "cuda":
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

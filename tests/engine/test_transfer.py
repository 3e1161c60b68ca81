"""Host <-> device copies without stream waits (``miles.engine.transfer``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miles.engine.transfer import HostCopy, copy_to, to_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_paths_are_plain_copies():
    cpu = torch.device("cpu")
    assert torch.equal(to_device([1, 2, 3], cpu), torch.tensor([1, 2, 3]))
    assert to_device([True, False], cpu, torch.bool).dtype == torch.bool
    assert torch.equal(to_device(np.arange(4), cpu), torch.arange(4))
    t = torch.arange(3)
    assert to_device(t, cpu) is t
    dst = torch.zeros(3, dtype=torch.long)
    copy_to(dst, t)
    assert torch.equal(dst, t)
    src = torch.arange(5.0)
    copy = HostCopy(src)
    src.add_(1)  # the copy was taken when asked for, not when read
    assert copy.ready() and torch.equal(copy.wait(), torch.arange(5.0))


@pytest.mark.gpu
@cuda
def test_cuda_copies_arrive_in_stream_order():
    dev = torch.device("cuda")
    x = to_device(list(range(1000)), dev)
    y = to_device(x, dev)  # already there: no host round trip
    assert y.is_cuda and torch.equal(y.cpu(), torch.arange(1000))
    dst = torch.zeros(1000, dtype=torch.long, device=dev)
    copy_to(dst, torch.arange(1000) * 2)
    back = HostCopy(dst * 3)
    assert back.host.is_pinned()
    assert torch.equal(back.wait(), torch.arange(1000) * 6) and back.ready()

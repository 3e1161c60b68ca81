"""Host <-> device copies without stream waits (``miles.utils.transfer``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miles.utils.transfer import HostCopy, copy_to, to_device

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


@pytest.mark.gpu
@cuda
def test_the_pinned_ring_reuses_slots_only_after_their_copies():
    """Far more copies than slots, each of different data, queued behind a long kernel: every
    one arrives intact (a slot overwritten before its copy ran would corrupt an earlier one)."""
    from miles.utils.transfer import PinnedRing

    dev = torch.device("cuda")
    ring = PinnedRing(slots=4, slot_bytes=1024)
    big = torch.randn(4096, 4096, device=dev)
    _ = big @ big  # keeps the stream busy while the copies queue up
    outs = [ring.copy(torch.full((100,), i, dtype=torch.long), dev) for i in range(40)]
    assert all(o is not None for o in outs)
    for i, o in enumerate(outs):
        assert torch.equal(o.cpu(), torch.full((100,), i, dtype=torch.long))
    dst = torch.zeros(3, 5, device=dev)
    assert ring.copy(torch.ones(3, 5), dev, dst) is dst and torch.equal(dst.cpu(), torch.ones(3, 5))
    assert ring.copy(torch.zeros(1000, dtype=torch.long), dev) is None  # larger than a slot
    assert torch.equal(to_device(list(range(5000)), dev).cpu(), torch.arange(5000))  # falls back

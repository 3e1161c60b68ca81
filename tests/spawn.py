"""For ``torch.multiprocessing.spawn`` workers of the gloo tests."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def exits_cleanly(worker: Callable[..., None]) -> Callable[..., None]:
    """Wrap a spawn worker: once it returns, meet the other ranks at a barrier (if its group is
    still up), destroy the group and leave with ``os._exit(0)``, skipping the interpreter's
    teardown. There, a gloo thread still joinable aborted a rank whose work was done ("terminate
    called without an active exception", SIGABRT) on loaded 2-core CI machines, in
    ``test_optimizer_offload`` and ``test_train_step``. An exception still propagates to
    ``mp.spawn`` as before."""

    @functools.wraps(worker)
    def run(*args: Any) -> None:
        worker(*args)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return run

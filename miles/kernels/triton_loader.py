"""Lazy access to the Triton kernels of ``miles.kernels.triton`` (the one place that imports
Triton): nothing is imported until a CUDA path first asks, so a CPU run never loads Triton.

Each family of kernels has an environment switch; ``=torch`` keeps its torch path on CUDA too:
``MILES_INVARIANT_KERNELS`` (batch-invariant matmul and attention), ``MILES_DECODE_KERNEL``
(paged decode attention), ``MILES_FUSED_KERNELS`` (the engine's RMSNorm and rotary),
``MILES_LM_HEAD_KERNEL`` (the trainer's LM-head softmax statistics).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType


@functools.cache
def triton_module(name: str, switch: str) -> ModuleType | None:
    """``miles.kernels.triton.<name>``, or ``None`` without Triton or when ``$switch`` is
    ``torch``. Cached: call ``triton_module.cache_clear()`` after changing the switch."""
    if os.environ.get(switch, "triton") == "torch":
        return None
    try:
        return importlib.import_module(f"miles.kernels.triton.{name}")
    except ImportError:
        return None

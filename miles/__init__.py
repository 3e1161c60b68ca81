"""Miles: reinforcement-learning post-training for LLMs, mixture-of-experts first.

Importing ``miles`` is cheap: torch and the heavy subsystems load only when used, so that
``miles --help`` answers at once. ``miles.LLM`` (offline generation) is resolved on first access.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# MKL (torch's CPU GEMMs) sums a row in an order that depends on the row's place in its block and
# on the thread count unless its conditional numerical reproducibility is strict; true on-policy
# (engine and trainer log-probs equal bit for bit) needs a row's bits to depend on that row alone.
# MKL reads this at its first call, so it is set here, before any model code runs (unless the
# user chose a mode). docs/true_on_policy.md, "CPU".
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
__all__ = ["LLM", "__version__"]

# Public name -> module defining it, imported on first attribute access (PEP 562); by module
# name through importlib, so that ``import miles`` itself stays free of torch.
_LAZY = {"LLM": "miles.engine.llm"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'miles' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value

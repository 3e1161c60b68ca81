"""Miles: reinforcement-learning post-training for LLMs, mixture-of-experts first.

Importing ``miles`` is cheap: torch and the heavy subsystems load only when used, so that
``miles --help`` answers at once. ``miles.LLM`` (offline generation) is resolved on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

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

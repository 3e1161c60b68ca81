"""Miles: reinforcement-learning post-training for LLMs, mixture-of-experts first.

Importing ``miles`` is cheap: torch and the heavy subsystems load only when used, so that
``miles --help`` answers at once.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]

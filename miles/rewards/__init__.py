"""Reward functions: built-ins by name (``--rm-type``), custom hooks by dotted path.

Importing this package is cheap: the built-ins are imported on first use.
See :mod:`miles.rewards.registry` and docs/rewards_and_data.md.
"""

from miles.rewards.registry import BUILTIN_REWARDS, FunctionLoadError, get_reward_function, load_function

__all__ = ["BUILTIN_REWARDS", "FunctionLoadError", "get_reward_function", "load_function"]

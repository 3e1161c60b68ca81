"""Built-in reward functions by name (``--rm-type``) and ``load_function`` for dotted paths.

Every reward hook has slime's signature: ``(args, sample) -> float`` (``async def`` or plain
``def``); with ``--group-rm``, ``(args, samples) -> list[float]``. ``args`` is the run's
``RolloutConfig`` (rewards read e.g. ``args.rm_url``).

Built-ins (exact rules in each module and in docs/rewards_and_data.md):
``math``, ``dapo``, ``deepscaler`` (:mod:`miles.rewards.math`), ``countdown``
(:mod:`miles.rewards.countdown`), ``exact``, ``exact_ci``, ``f1`` (:mod:`miles.rewards.simple`),
``remote_rm`` (:mod:`miles.rewards.remote`). Modules are imported on first use, so importing
the registry is cheap and httpx is loaded only for ``remote_rm``.

Where :func:`load_function` looks: a dotted path's first component is imported from the
current working directory when that directory holds it (``my_reward.py`` or a ``my_reward/``
folder), else from ``sys.path``. So ``--custom-rm-path my_reward.score`` run from the folder
holding ``my_reward.py`` works without ``PYTHONPATH=.``, as it does for slime users with their
launch scripts. The directory is then put at the front of ``sys.path`` (as an absolute path,
as ``PYTHONPATH=.`` would, unless it is there already), so the hook's own imports of its
neighbours work too; it is added only when a hook is found there.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miles.utils.suggest import did_you_mean

__all__ = [
    "BUILTIN_REWARDS",
    "FunctionLoadError",
    "get_reward_function",
    "is_async_callable",
    "load_function",
]

RewardFn = Callable[..., Any]

# name -> "module:attribute" of the hook
BUILTIN_REWARDS: dict[str, str] = {
    "math": "miles.rewards.math:rm_math",
    "dapo": "miles.rewards.math:rm_dapo",
    "deepscaler": "miles.rewards.math:rm_deepscaler",
    "countdown": "miles.rewards.countdown:rm_countdown",
    "exact": "miles.rewards.simple:rm_exact",
    "exact_ci": "miles.rewards.simple:rm_exact_ci",
    "f1": "miles.rewards.simple:rm_f1",
    "starts_with_digit": "miles.rewards.simple:rm_starts_with_digit",
    "remote_rm": "miles.rewards.remote:remote_rm",
}


class FunctionLoadError(ImportError):
    """A dotted path does not name a usable function; the message says which part is wrong."""


def get_reward_function(name: str) -> RewardFn:
    """The built-in reward hook called ``name``; ``ValueError`` lists the known names."""
    target = BUILTIN_REWARDS.get(name)
    if target is None:
        raise ValueError(
            f"unknown rm_type {name!r}{did_you_mean(name, BUILTIN_REWARDS)}; "
            f"built-in rewards: {', '.join(sorted(BUILTIN_REWARDS))} (or pass --custom-rm-path)"
        )
    module, attr = target.split(":")
    fn: RewardFn = getattr(importlib.import_module(module), attr)
    return fn


def load_function(path: str, *, require_async: bool = False, what: str = "function") -> Callable[..., Any]:
    """Import ``package.module.attr`` (or ``package.module:attr``) and return the callable.

    The module is looked for in the current directory, then on ``sys.path`` (module docstring).
    Raises :class:`FunctionLoadError` naming the problem: an empty or relative path, no module
    of that name (the longest importable prefix is named), an error while importing the module
    (chained), a missing attribute (with the closest public name), an object that is not
    callable, or - with ``require_async`` - a function that is not ``async def``.
    ``what`` names the hook in messages (``"reward function"``, ``"filter"``).
    """
    if not path or not isinstance(path, str) or path.startswith(".") or path.endswith("."):
        raise FunctionLoadError(f"{what} path must be 'package.module.function', got {path!r}")
    _use_current_directory(path.partition(":")[0].split(".")[0])
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
        module, attrs = _import(module_name, path, what), attr_path.split(".")
    else:
        parts = path.split(".")
        if len(parts) < 2:
            raise FunctionLoadError(f"{what} path must be 'package.module.function', got {path!r}")
        # The longest importable prefix is the module: "a.b.c.f" may be module a.b.c with
        # attribute f, or module a.b with attribute c.f (a class method).
        module, attrs = None, []
        for split in range(len(parts) - 1, 0, -1):
            module = _try_import(".".join(parts[:split]), path, what)
            if module is not None:
                attrs = parts[split:]
                break
        if module is None:
            raise FunctionLoadError(
                f"cannot load {what} {path!r}: no module named {parts[0]!r}{_where_looked()}"
            )
    obj: Any = module
    for i, attr in enumerate(attrs):
        if not hasattr(obj, attr):
            owner = ".".join([module.__name__, *attrs[:i]])
            public = [n for n in dir(obj) if not n.startswith("_")]
            if obj is module and hasattr(module, "__path__"):  # a package: a submodule was meant
                raise FunctionLoadError(
                    f"cannot load {what} {path!r}: no module named {owner + '.' + attr!r} "
                    f"and package {owner!r} has no attribute {attr!r}{did_you_mean(attr, public)}"
                )
            raise FunctionLoadError(
                f"cannot load {what} {path!r}: {owner!r} has no attribute {attr!r}{did_you_mean(attr, public)}"
            )
        obj = getattr(obj, attr)
    if not callable(obj):
        raise FunctionLoadError(f"{what} {path!r} is a {type(obj).__name__}, not a function")
    if require_async and not is_async_callable(obj):
        raise FunctionLoadError(f"{what} {path!r} must be 'async def'")
    return obj


def _import(name: str, path: str, what: str) -> Any:
    module = _try_import(name, path, what)
    if module is None:
        where = _where_looked() if "." not in name else ""
        raise FunctionLoadError(f"cannot load {what} {path!r}: no module named {name!r}{where}")
    return module


def _try_import(name: str, path: str, what: str) -> Any:
    """The module ``name``; None if it (or a parent) does not exist; errors inside it raise."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # Missing = the module itself or one of its parents; a missing dependency *inside*
        # an existing module is a real error worth showing.
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            return None
        raise FunctionLoadError(f"cannot load {what} {path!r}: importing {name!r} failed: {e}") from e
    except Exception as e:
        raise FunctionLoadError(
            f"cannot load {what} {path!r}: importing {name!r} raised {type(e).__name__}: {e}"
        ) from e


def _use_current_directory(top: str) -> None:
    """Put the current directory at the front of ``sys.path`` if it holds module ``top``.

    Only then: a directory that holds no hook changes nothing. Entries that already mean the
    current directory (``""``, ``"."``, its absolute path) are not duplicated.
    """
    if not top.isidentifier() or top in sys.modules:
        return
    try:
        cwd = Path.cwd()
    except OSError:  # the directory was deleted under us: nothing to find there
        return
    if not ((cwd / f"{top}.py").is_file() or (cwd / top).is_dir()):
        return
    if not any(Path(p or ".").resolve() == cwd.resolve() for p in sys.path):
        sys.path.insert(0, str(cwd))
    importlib.invalidate_caches()  # the file may be newer than the finder's listing of the folder


def _where_looked() -> str:
    try:
        return f" (looked in the current directory {os.getcwd()} and on sys.path)"
    except OSError:
        return " (looked on sys.path)"


def is_async_callable(obj: Any) -> bool:
    """An ``async def`` function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(type(obj).__call__)

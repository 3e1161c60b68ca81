"""A small name -> object registry, so callers pick algorithms by name instead of if/elif ladders."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised by :meth:`Registry.get` for an unregistered name; the message lists the known names."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message, quoting it and escaping newlines.
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to objects of one kind (functions, usually).

    >>> ESTIMATORS: Registry[Callable[..., int]] = Registry("advantage estimator")
    >>> @ESTIMATORS.register("grpo")
    ... def grpo() -> int:
    ...     return 1
    >>> ESTIMATORS.get("grpo")()
    1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator registering the decorated object under ``name`` (and ``aliases``); returns it unchanged."""

        def decorator(obj: T) -> T:
            for key in (name, *aliases):
                self.add(key, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name``; a name can be registered once."""
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered under ``name``; :class:`UnknownNameError` (a ``KeyError``) if none."""
        try:
            return self._items[name]
        except KeyError:
            pass
        known = ", ".join(self.names()) or "(none)"
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; known: {known}")

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"

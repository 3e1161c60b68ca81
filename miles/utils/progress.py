"""Progress of a long phase (model load, rollout, training, evaluation) on the console.

A :class:`Progress` has a description, a known total and a unit. On a terminal it redraws one
line (``\\r``) at most every ``redraw_s``; in a log file (stderr not a terminal) it writes a whole
line at most every ``interval_s``, so logs stay readable. Every line shows done/total, the
elapsed time and, once something is done, an ETA. :meth:`close` writes the final line.

:func:`announce` prints one line at once (``"[miles] loading model ..."``): a phase whose
length is unknown still says what it is doing within a moment of starting.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

__all__ = ["Progress", "announce", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``"42.0 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def announce(message: str, stream: TextIO | None = None) -> None:
    """Write ``[miles] message`` and flush, so it appears before the work it announces."""
    out = stream if stream is not None else sys.stderr
    out.write(f"[miles] {message}\n")
    out.flush()


class Progress:
    """Done/total of one phase; ``advance`` from any thread, ``close`` once (or use ``with``)."""

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str = "",
        *,
        stream: TextIO | None = None,
        interval_s: float = 10.0,
        redraw_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self._out = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._out, "isatty", lambda: False)())
        self._every = redraw_s if self._tty else interval_s
        self._clock = clock
        self._start = self._last = clock()
        self._lock = threading.Lock()
        self._closed = False
        self._write(self.line())

    def line(self) -> str:
        """``"rollout 3: 96/128 samples, 12.3 s, ETA 4.1 s"``."""
        elapsed = self._clock() - self._start
        unit = f" {self.unit}" if self.unit else ""
        text = f"{self.desc}: {self.done}/{self.total}{unit}, {format_seconds(elapsed)}"
        if 0 < self.done < self.total:
            text += f", ETA {format_seconds(elapsed / self.done * (self.total - self.done))}"
        return text

    def advance(self, n: int = 1) -> None:
        with self._lock:
            if self._closed:
                return
            self.done = min(self.total, self.done + n)
            now = self._clock()
            if now - self._last >= self._every:
                self._last = now
                self._write(self.line())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._write(self.line(), final=True)

    def _write(self, text: str, final: bool = False) -> None:
        if self._tty:
            self._out.write(f"\r\x1b[K[miles] {text}" + ("\n" if final else ""))
        else:
            self._out.write(f"[miles] {text}\n")
        self._out.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

"""A sampling profiler of this process's Python threads, for the benchmarks' ``--sample-threads``.

A daemon thread wakes every ``interval`` seconds, reads every other thread's current Python stack
(``sys._current_frames``) and counts it. Time in a C call (a torch op, a lock wait, a CUDA
synchronisation) is charged to the Python frame that made it, so a thread blocked on the GPU
shows the line that waits. Sampling needs the GIL, so a thread that holds it for long stretches
delays the samples: the counts are a distribution over the samples taken, not exact seconds.

    with ThreadSampler(interval=0.002) as sampler:
        run()
    print(sampler.report())
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from types import FrameType
from typing import Any

Frame = tuple[str, int, str]  # (file, line, function)


def _stack(frame: FrameType | None, depth: int) -> tuple[Frame, ...]:
    """The innermost ``depth`` frames, innermost first."""
    out: list[Frame] = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        out.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return tuple(out)


def _short(f: Frame) -> str:
    path = f[0]
    for marker in ("/miles/", "/benchmarks/", "/site-packages/", "/lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{f[1]} {f[2]}"


class ThreadSampler:
    """Counts each thread's Python stacks (``depth`` innermost frames) every ``interval`` s."""

    def __init__(self, interval: float = 0.002, depth: int = 40) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.interval = interval
        self.depth = depth
        self.stacks: dict[str, Counter[tuple[Frame, ...]]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ThreadSampler:
        self._thread = threading.Thread(target=self._run, name="thread-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, str(ident))
                self.stacks.setdefault(name, Counter())[_stack(frame, self.depth)] += 1
            self.samples += 1

    def report(self, top: int = 15, threads: tuple[str, ...] | None = None) -> str:
        """Per thread: its share of samples at each innermost frame (self) and anywhere on the
        stack (cumulative, each function counted once per sample)."""
        lines = [f"thread sampler: {self.samples} samples every {1e3 * self.interval:.1f} ms"]
        for name, counter in sorted(self.stacks.items(), key=lambda kv: -sum(kv[1].values())):
            if threads is not None and name not in threads:
                continue
            total = sum(counter.values())
            own: Counter[str] = Counter()
            cum: Counter[str] = Counter()
            for stack, n in counter.items():
                if stack:
                    own[_short(stack[0])] += n
                for fn in {f"{_short(f).split(':')[0]} {f[2]}" for f in stack}:
                    cum[fn] += n
            lines.append(f"-- thread {name}: {total} samples")
            lines.append("   self (innermost line):")
            lines += [f"   {100 * n / total:5.1f}%  {k}" for k, n in own.most_common(top)]
            lines.append("   cumulative (function anywhere on the stack):")
            lines += [f"   {100 * n / total:5.1f}%  {k}" for k, n in cum.most_common(top)]
        return "\n".join(lines)

    def wall(self) -> float:
        return self.samples * self.interval


def _demo() -> None:  # python benchmarks/thread_sampler.py: a busy thread and a sleeping one
    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    with ThreadSampler() as s:
        t = threading.Thread(target=time.sleep, args=(0.3,), name="sleeper")
        t.start()
        spin(0.3)
        t.join()
    print(s.report(top=5))


if __name__ == "__main__":
    _demo()

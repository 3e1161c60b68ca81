"""Score samples with a built-in or custom reward; failures mark samples, never stop the run.

Contract of a reward hook (slime's): per sample ``async def rm(args, sample) -> float``; with
``group_rm``, per group ``async def rm(args, samples) -> list[float]`` (one reward per sample,
in order). A hook may return a dict of named rewards; then ``args.reward_key`` picks the one
used as ``Sample.reward`` and the dict is kept in ``sample.metadata["reward_details"]``.

Every call (per sample or per group, built-in or custom) may take ``--reward-timeout`` seconds
(``args.reward_timeout``; a remote reward's retries count in it). ``async def`` hooks run on the
event loop and must not block it (``await`` I/O; a blocking call in a coroutine stalls every
sample); at the timeout the coroutine is cancelled. Plain ``def`` hooks, the built-ins
included, run in a worker thread each, so one that blocks cannot stall the loop and its timeout
still fires: several may run at once, so they must be thread-safe. A thread that never returns
is abandoned (it is a daemon thread: the process can still exit), and its result, if it ever
comes, is ignored. While calls are outstanding, a :class:`RewardWatch` logs one line every
``interval_s`` (30 s) saying how many samples wait on which reward and for how long.

Samples already ``FAILED`` or ``ABORTED`` are not scored. A hook that raises, times out, or
returns something that is not a finite number marks its sample (with ``group_rm``: its whole
group) ``FAILED`` with ``Sample.error`` set to ``"<ExceptionType>: <message>"`` (a timeout:
``"TimeoutError: reward <name> timed out after <N> s (--reward-timeout)"``); a
:class:`FailureLog` counts errors per distinct message and logs each message once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from miles.rewards.registry import get_reward_function, is_async_callable, load_function
from miles.types import Sample, SampleStatus
from miles.utils.progress import format_seconds

__all__ = [
    "DEFAULT_REWARD_TIMEOUT_S",
    "FailureLog",
    "RewardWatch",
    "resolve_reward",
    "reward_name",
    "score_samples",
]

logger = logging.getLogger(__name__)

RewardSpec = str | Callable[..., Any]
FAILED_METRIC = "rollout/failed_samples"
DEFAULT_REWARD_TIMEOUT_S = 600.0  # the default of --reward-timeout (RolloutConfig)
DEFAULT_STALL_LOG_S = 30.0


class FailureLog:
    """Errors of failed samples: counted per distinct message, each message logged once.

    The caller reports :meth:`metrics` (``rollout/failed_samples``) every rollout step; the
    log object may live for the whole run so that a recurring error is not logged again.
    """

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.counts: dict[str, int] = {}
        self._log = log or logger

    def record(self, message: str) -> None:
        if message not in self.counts:
            self.counts[message] = 0
            self._log.warning("%s: sample failed: %s", FAILED_METRIC, message)
        self.counts[message] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def metrics(self) -> dict[str, float]:
        return {FAILED_METRIC: float(self.total)}

    def summary(self) -> str:
        """One line per distinct error, most frequent first: ``"12x ValueError: ..."``."""
        items = sorted(self.counts.items(), key=lambda kv: -kv[1])
        return "\n".join(f"{n}x {msg}" for msg, n in items)

    def fail(self, sample: Sample, error: BaseException | str) -> None:
        """Mark ``sample`` failed with ``error`` and record it."""
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        sample.status = SampleStatus.FAILED
        sample.error = message
        sample.reward = None
        self.record(message)


def resolve_reward(rm_type: str | None, custom_rm_path: str | None) -> RewardSpec:
    """What :func:`score_samples` should use: the ``--custom-rm-path`` function if set, else
    the ``--rm-type`` name (checked now, so a typo fails at start-up, not mid-rollout)."""
    if custom_rm_path:
        return load_function(custom_rm_path, what="reward function")
    if rm_type:
        get_reward_function(rm_type)
        return rm_type
    raise ValueError("no reward: set --rm-type (e.g. math, countdown, exact) or --custom-rm-path")


class RewardWatch:
    """Reward calls in flight, and one log line every ``interval_s`` while any has been waiting
    longer than ``interval_s``: ``"reward stalled: 12 samples waiting on my_rm.score for up to
    1 min 35 s (timeout 600 s)"``.

    Calls register with :meth:`begin`/:meth:`end`; :meth:`watching` runs the logger for the
    duration of a ``async with`` block and nests (concurrent scorers sharing one watch start one
    logger), so a rollout that scores many groups at once logs one line, not one per group.
    """

    def __init__(
        self,
        interval_s: float = DEFAULT_STALL_LOG_S,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._log = log or logger
        self._clock = clock
        self._calls: dict[int, tuple[str, int, float, float]] = {}  # id -> name, samples, start, timeout
        self._ids = itertools.count()
        self._depth = 0
        self._task: asyncio.Task[None] | None = None

    def begin(self, name: str, n_samples: int, timeout_s: float) -> int:
        token = next(self._ids)
        self._calls[token] = (name, n_samples, self._clock(), timeout_s)
        return token

    def end(self, token: int) -> None:
        self._calls.pop(token, None)

    def stalled(self) -> str | None:
        """The log line for calls waiting longer than ``interval_s`` (None if there are none)."""
        now = self._clock()
        by_name: dict[str, list[float]] = {}  # name -> [samples, longest wait, timeout]
        for name, n, start, timeout_s in self._calls.values():
            if now - start < self.interval_s:
                continue
            entry = by_name.setdefault(name, [0, 0.0, timeout_s])
            entry[0] += n
            entry[1] = max(entry[1], now - start)
        if not by_name:
            return None
        parts = [
            f"{int(n)} sample{'s' if n != 1 else ''} waiting on {name} for up to {format_seconds(wait)} "
            f"(timeout {timeout_s:g} s)"
            for name, (n, wait, timeout_s) in sorted(by_name.items(), key=lambda kv: -kv[1][0])
        ]
        return "reward stalled: " + "; ".join(parts)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[RewardWatch]:
        self._depth += 1
        if self._depth == 1:
            self._task = asyncio.ensure_future(self._run())
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0 and self._task is not None:
                self._task.cancel()
                self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            line = self.stalled()
            if line is not None:
                self._log.warning("%s", line)


async def score_samples(
    samples: Sequence[Sample],
    rm: RewardSpec,
    group_rm: bool = False,
    args: Any = None,
    failures: FailureLog | None = None,
    *,
    timeout_s: float | None = None,
    watch: RewardWatch | None = None,
) -> None:
    """Set ``sample.reward`` on every scorable sample (module docstring has the contract).

    ``rm`` is a built-in name (``--rm-type``) or a reward function. In per-sample mode with a
    name, ``sample.metadata["rm_type"]`` overrides the name for that sample (as slime does).
    With ``group_rm`` the function is called once per ``group_index``. Each call may take
    ``timeout_s`` seconds (default: ``args.reward_timeout``, else 600 s). ``watch`` reports
    stalled calls (default: a :class:`RewardWatch` of this call alone).
    """
    failures = failures if failures is not None else FailureLog()
    if timeout_s is None:
        timeout_s = float(getattr(args, "reward_timeout", None) or DEFAULT_REWARD_TIMEOUT_S)
    if not timeout_s > 0:
        raise ValueError(f"reward timeout must be > 0 s, got {timeout_s}")
    watch = watch if watch is not None else RewardWatch()
    todo = [s for s in samples if s.status not in (SampleStatus.FAILED, SampleStatus.ABORTED)]
    async with watch.watching():
        if group_rm:
            groups: dict[int, list[Sample]] = {}
            for s in todo:
                groups.setdefault(s.group_index, []).append(s)
            await asyncio.gather(
                *(_score_group(rm, args, g, failures, timeout_s, watch) for g in groups.values())
            )
        else:
            await asyncio.gather(
                *(_score_one(_pick(rm, s), args, s, failures, timeout_s, watch) for s in todo)
            )


def reward_name(rm: RewardSpec) -> str:
    """How logs and errors name a reward: the built-in's name, or ``module.qualname``."""
    if isinstance(rm, str):
        return rm
    qualname = getattr(rm, "__qualname__", None) or type(rm).__qualname__
    module = getattr(rm, "__module__", None)
    return f"{module}.{qualname}" if module else qualname


def _pick(rm: RewardSpec, sample: Sample) -> RewardSpec:
    override = sample.metadata.get("rm_type") if isinstance(rm, str) else None
    return override if isinstance(override, str) and override else rm


async def _call(rm: RewardSpec, timeout_s: float, watch: RewardWatch, n_samples: int, *call_args: Any) -> Any:
    """``rm(*call_args)``, bounded by ``timeout_s``; a timeout raises ``TimeoutError`` naming ``rm``."""
    fn = get_reward_function(rm) if isinstance(rm, str) else rm
    name = reward_name(rm)
    task = asyncio.ensure_future(_invoke(fn, name, call_args))
    token = watch.begin(name, n_samples, timeout_s)
    try:
        # asyncio.wait, not wait_for: wait_for waits for the cancelled call to finish, which a
        # coroutine that swallows the cancellation would never do.
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except BaseException:  # we are cancelled: so is the call
        task.cancel()
        raise
    finally:
        watch.end(token)
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise TimeoutError(f"reward {name} timed out after {timeout_s:g} s (--reward-timeout)")
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned call's late error as seen, so asyncio does not log it as unhandled."""
    if not task.cancelled():
        task.exception()


async def _invoke(fn: Callable[..., Any], name: str, call_args: tuple[Any, ...]) -> Any:
    result = fn(*call_args) if is_async_callable(fn) else await _in_daemon_thread(fn, name, call_args)
    if inspect.isawaitable(result):  # a plain def that returns a coroutine
        result = await result
    return result


def _in_daemon_thread(fn: Callable[..., Any], name: str, call_args: tuple[Any, ...]) -> asyncio.Future[Any]:
    """``fn(*call_args)`` in a new daemon thread, as a future of this loop.

    Not ``loop.run_in_executor``: its threads are joined when the loop closes and at exit, so
    one hung call would hang the end of ``asyncio.run`` and the process with it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():  # a timed-out call's future is already cancelled
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            value, ok = fn(*call_args), True
        except Exception as e:
            value, ok = e, False
        except BaseException as e:  # SystemExit and the like must not end the thread silently
            value, ok = RuntimeError(f"reward {name} raised {type(e).__name__}: {e}"), False
        # A closed loop raises RuntimeError: this call timed out and was given up.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=run, name=f"reward {name}", daemon=True).start()
    return future


async def _score_one(
    rm: RewardSpec, args: Any, sample: Sample, failures: FailureLog, timeout_s: float, watch: RewardWatch
) -> None:
    try:
        sample.reward = _to_reward(await _call(rm, timeout_s, watch, 1, args, sample), args, sample)
    except Exception as e:
        failures.fail(sample, e)


async def _score_group(
    rm: RewardSpec, args: Any, group: list[Sample], failures: FailureLog, timeout_s: float, watch: RewardWatch
) -> None:
    try:
        values = await _call(rm, timeout_s, watch, len(group), args, group)
        if not isinstance(values, (list, tuple)) or len(values) != len(group):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise TypeError(
                f"group reward function must return one reward per sample ({len(group)}), got {got}"
            )
        rewards = [_to_reward(v, args, s) for v, s in zip(values, group)]
    except Exception as e:
        for s in group:
            failures.fail(s, e)
        return
    for s, r in zip(group, rewards):
        s.reward = r


def _to_reward(value: Any, args: Any, sample: Sample) -> float:
    if isinstance(value, dict):
        key = getattr(args, "reward_key", None)
        if key is None:
            raise TypeError(f"reward function returned a dict with keys {sorted(value)}; set --reward-key")
        if key not in value:
            raise KeyError(f"reward dict has no key {key!r} (--reward-key); keys: {sorted(value)}")
        sample.metadata["reward_details"] = value
        value = value[key]
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"reward must be a finite number, got {value!r}")
    return float(value)

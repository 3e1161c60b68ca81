"""``AsyncEngine``: one thread owns an ``Engine`` and drives it; asyncio code talks to it.

Threading contract. ``Engine`` is not thread-safe, so exactly one thread (the *engine thread*,
started by ``start()``) ever touches it. Everything else reaches it through a command queue:

- ``submit(specs)`` / ``generate(specs)`` add requests; their outputs come back on an
  ``asyncio.Queue`` owned by the caller's event loop (handed over with ``call_soon_threadsafe``);
- ``abort(ids)`` aborts requests (their final ``abort`` outputs still reach their streams);
- ``call(fn)`` runs ``fn(engine)`` on the engine thread *between two steps* and returns its
  result (or raises its exception) in the caller's loop; the RL hooks (weight updates, pause,
  memory release) and ``stats()`` go through it, so they never race a forward.

Admission is bounded by the engine's config: a submission that would leave more than
``max_running_requests + max_queued_requests`` requests unfinished raises ``EngineOverloaded``
(the server's 503) and adds nothing. ``offload(fn)`` runs request preparation (tokenizing, chat
templates) on one worker thread, so the event loop stays free to answer ``/health``.

Lifecycle: ``start()`` -> use -> ``close()``. ``close()`` aborts what is in flight, delivers the
final outputs and joins the thread. A stream that its consumer leaves early (client disconnect:
the task is cancelled, or the generator is closed) aborts its unfinished requests, which frees
their KV blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from miles.engine.engine import Engine, EngineStats
from miles.engine.request import RequestOutput
from miles.types import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()
_THROUGHPUT_WINDOW_S = 10.0


class EngineOverloaded(RuntimeError):
    """Too many requests are unfinished to admit more now (``max_queued_requests``)."""


@dataclass(frozen=True)
class RequestSpec:
    """One request for ``Engine.add_request`` (same argument names)."""

    prompt_ids: Sequence[int]
    sampling_params: SamplingParams
    request_id: str
    return_prompt_logprobs: bool = False
    top_logprobs_num: int = 0
    return_routed_experts: bool = False
    stream: bool = True  # every step's cumulative output, or the final one only


class _Sink:
    """Where the outputs of one submission go: an asyncio queue of ``(index, output | error)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, index_of: dict[str, int]) -> None:
        self.loop = loop
        # None is the acknowledgement that every request was added.
        self.queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        self.index_of = index_of
        self.unfinished = set(index_of)

    def put(self, index: int, item: RequestOutput | BaseException | None) -> None:
        # RuntimeError: the consumer's loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))


class RequestStream:
    """The outputs of one ``AsyncEngine.submit``: iterate for ``(index in specs, output)`` after
    every step that advanced one of them (outputs are cumulative) until all are finished.

    Leaving the iteration early (break, cancellation on client disconnect) or ``close()``
    aborts the unfinished requests, which frees their KV blocks.
    """

    def __init__(self, owner: AsyncEngine, sink: _Sink) -> None:
        self._owner = owner
        self._sink = sink

    @property
    def request_ids(self) -> list[str]:
        return list(self._sink.index_of)

    @property
    def finished(self) -> bool:
        return not self._sink.unfinished

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        sink = self._sink
        try:
            while sink.unfinished:
                index, item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    continue
                if item.finished:
                    sink.unfinished.discard(item.request_id)
                yield index, item
        finally:
            self.close()

    def close(self) -> None:
        """Abort what is unfinished (idempotent; safe from any coroutine of the owning loop)."""
        pending, self._sink.unfinished = list(self._sink.unfinished), set()
        self._owner._post_abort(pending)


class AsyncEngine:
    """Asyncio front of an ``Engine`` driven by its own thread (see the module docstring)."""

    def __init__(self, engine: Engine, *, idle_poll_s: float = 0.5, own_stream: bool = False) -> None:
        """At most ``engine.config.max_queued_requests`` requests wait beyond those the engine
        runs together (``max_running_requests``).

        ``own_stream`` (CUDA only): the engine thread queues its kernels on a CUDA stream of its
        own, so that they can run beside another thread's on the same GPU (an asynchronous RL
        run's trainer). Tensors that cross between the threads must then be synchronized by the
        caller (``call`` runs on the engine's stream)."""
        self.engine = engine
        self._own_stream = own_stream
        self.max_unfinished = engine.config.max_running_requests + engine.config.max_queued_requests
        # Requests admitted and not finished (submitted, queued for the engine thread, or in the
        # engine); changed under the lock by the loop (admission) and the engine thread (ends).
        self._unfinished = 0
        self._unfinished_lock = threading.Lock()
        self._offload = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="miles-prepare")
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # request id -> sink; engine thread only
        self._idle_poll_s = idle_poll_s
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ids = itertools.count()
        # Submissions waiting to be handed to the engine thread together (see _enqueue_add).
        self._adds: list[tuple[list[RequestSpec], _Sink]] = []
        self._adds_lock = threading.Lock()
        self._adds_flush_scheduled = False
        # Counters read by /metrics; written by the engine thread only (ints are atomic enough).
        self.generated_tokens_total = 0
        self._tokens_seen = engine.tokens_generated
        self.prompt_tokens_total = 0
        self.requests_total = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> AsyncEngine:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._thread = threading.Thread(target=self._run, name="miles-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float | None = 30.0) -> None:
        """Abort everything in flight, deliver the final outputs and stop the engine thread."""
        if self._closed:
            return
        self._closed = True
        self._offload.shutdown(wait=False, cancel_futures=True)
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def new_request_id(self) -> str:
        return f"miles-{time.time_ns():x}-{next(self._ids)}"

    @property
    def num_unfinished(self) -> int:
        """Requests admitted and not finished yet."""
        return self._unfinished

    async def offload(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the preparation thread (one, so a tokenizer is never used by two
        preparations at once) and return its result: CPU-heavy request parsing stays off the
        event loop."""
        self._check_open()
        return await asyncio.get_running_loop().run_in_executor(self._offload, fn)

    def _admit(self, count: int) -> None:
        with self._unfinished_lock:
            if self._unfinished + count > self.max_unfinished:
                raise EngineOverloaded(
                    f"the engine is full: {self._unfinished} requests unfinished, {count} more asked, "
                    f"at most {self.max_unfinished} (max running + max queued requests); retry later"
                )
            self._unfinished += count

    def _release(self, count: int) -> None:
        with self._unfinished_lock:
            self._unfinished -= count

    # ---- requests ----------------------------------------------------------------------------

    async def submit(self, specs: Sequence[RequestSpec]) -> RequestStream:
        """Add ``specs`` together (all or none) and return the stream of their outputs.

        An input the engine rejects raises its ``ValueError`` here, with nothing left queued;
        a full engine raises ``EngineOverloaded``.
        """
        self._check_open()
        ids = [s.request_id for s in specs]
        if not ids:
            raise ValueError("no requests to submit")
        if len(set(ids)) != len(ids):
            raise ValueError("rid: request ids must be unique within a request")
        loop = asyncio.get_running_loop()
        sink = _Sink(loop, {rid: i for i, rid in enumerate(ids)})
        self._admit(len(ids))
        self._enqueue_add(list(specs), sink, loop)
        stream = RequestStream(self, sink)
        try:
            _, ack = await sink.queue.get()
        except BaseException:
            stream.close()  # cancelled while being added: do not leave orphans running
            raise
        if isinstance(ack, BaseException):
            raise ack
        return stream

    def _enqueue_add(self, specs: list[RequestSpec], sink: _Sink, loop: asyncio.AbstractEventLoop) -> None:
        """Queue the adding of ``specs``. Submissions made in the same pass of the event loop reach
        the engine thread as one command, so the engine admits them together: a rollout's
        hundreds of ``generate`` calls, made one after another, used to arrive a few at a time
        whenever the engine thread won the GIL between two of them, each few making its own
        small prefill step (and keeping decode off the CUDA graphs and the overlap meanwhile)."""
        with self._adds_lock:
            self._adds.append((specs, sink))
            if self._adds_flush_scheduled:
                return
            self._adds_flush_scheduled = True
        loop.call_soon(self._flush_adds)

    def _flush_adds(self) -> None:
        with self._adds_lock:
            adds, self._adds = self._adds, []
            self._adds_flush_scheduled = False

        if self._closed:  # close() came first: the engine thread will not run it
            for specs, sink in adds:
                self._release(len(specs))
                sink.put(-1, RuntimeError("the engine was shut down"))
            return

        def command() -> None:
            for specs, sink in adds:
                self._add(specs, sink)

        self._commands.put(command)

    async def generate(self, specs: Sequence[RequestSpec]) -> list[RequestOutput]:
        """The final output of every spec, in order (its requests are not streamed)."""
        stream = await self.submit([dataclasses.replace(s, stream=False) for s in specs])
        final: dict[int, RequestOutput] = {}
        async for index, out in stream:
            if out.finished:
                final[index] = out
        return [final[i] for i in range(len(specs))]

    def _post_abort(self, request_ids: Sequence[str]) -> None:
        if not self._closed:
            for rid in request_ids:
                self._commands.put(lambda rid=rid: self.engine.abort(rid))

    async def abort(self, request_id: str | None = None) -> list[str]:
        """Abort one request (``None``: all); returns the ids aborted."""
        return await self.call(lambda e: e.abort(request_id))

    # ---- control -----------------------------------------------------------------------------

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between two steps; return or raise its result."""
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():  # the caller gave up (cancelled)
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def command() -> None:
            try:
                result, error = fn(self.engine), None
            except Exception as e:  # handed to the caller; the engine thread goes on
                result, error = None, e
            loop.call_soon_threadsafe(settle, result, error)

        self._commands.put(command)
        return await future

    async def stats(self) -> EngineStats:
        return await self.call(lambda e: e.stats())

    def token_throughput(self) -> float:
        """Generated tokens per second over the last few seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= _THROUGHPUT_WINDOW_S]
        return sum(n for _, n in recent) / _THROUGHPUT_WINDOW_S if recent else 0.0

    # ---- engine thread -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or self._thread is None:
            raise RuntimeError("the engine is not running (AsyncEngine not started or closed)")

    def _add(self, specs: list[RequestSpec], sink: _Sink) -> None:
        added: list[str] = []
        try:
            for spec in specs:
                self.engine.add_request(
                    spec.prompt_ids,
                    spec.sampling_params,
                    spec.request_id,
                    return_prompt_logprobs=spec.return_prompt_logprobs,
                    top_logprobs_num=spec.top_logprobs_num,
                    return_routed_experts=spec.return_routed_experts,
                    stream=spec.stream,
                )
                added.append(spec.request_id)
                self._sinks[spec.request_id] = sink
        except Exception as e:
            for rid in added:  # all or nothing: withdraw the ones already queued
                self.engine.abort(rid)
                self._sinks.pop(rid, None)
            self._release(len(specs))
            sink.put(-1, e)
            return
        sink.put(-1, None)
        self.requests_total += len(specs)
        self.prompt_tokens_total += sum(len(s.prompt_ids) for s in specs)

    def _paused(self) -> bool:
        return bool(getattr(self.engine, "is_paused", False))

    def _run(self) -> None:
        if self._own_stream and self.engine.model.device.type == "cuda":
            # Current for this thread only: the caller's threads keep theirs.
            with torch.cuda.stream(torch.cuda.Stream(self.engine.model.device)):
                self._serve()
        else:
            self._serve()

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            busy = self.engine.has_unfinished() and not self._paused()
            commands: list[Any] = []
            if not busy:  # idle: sleep until a command comes (the timeout re-checks pause state)
                with contextlib.suppress(queue.Empty):
                    commands.append(self._commands.get(timeout=self._idle_poll_s))
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command is _STOP:
                    stopping = True
                    continue
                try:
                    command()
                except Exception:  # a command's own errors are reported by it; this is a bug
                    logger.exception("engine command failed")
            if stopping:
                self.engine.abort()
            if commands or (self.engine.has_unfinished() and not self._paused()):
                self._step()
        self._fail_all(RuntimeError("the engine was shut down"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # A failed forward must not kill the server: fail and drop what was in flight.
            logger.exception("engine step failed; aborting the requests in flight")
            self._fail_all(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
            try:
                self.engine.abort()
                self.engine.step()
            except Exception:
                logger.exception("could not abort after a failed step")
            return
        # Counters first: a consumer woken by its output then reads totals that include it.
        new_tokens = self.engine.tokens_generated - self._tokens_seen
        self._tokens_seen = self.engine.tokens_generated
        if new_tokens:
            self.generated_tokens_total += new_tokens
            now = time.monotonic()
            self._recent.append((now, new_tokens))
            while self._recent and now - self._recent[0][0] > _THROUGHPUT_WINDOW_S:
                self._recent.popleft()
        finished = 0
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if out.finished and self._sinks.pop(out.request_id, None) is not None:
                finished += 1
            if sink is not None:
                sink.put(sink.index_of[out.request_id], out)
        if finished:
            self._release(finished)

    def _fail_all(self, error: BaseException) -> None:
        sinks, self._sinks = self._sinks, {}
        self._release(len(sinks))
        for rid, sink in sinks.items():
            sink.put(sink.index_of[rid], error)

"""``EngineClient``: how rollout code talks to an engine, over HTTP or in process.

Both implementations take SGLang ``/generate`` bodies and return SGLang ``/generate`` response
dicts (see ``miles.engine.protocol``), so rollout code does not care whether the engine is
``miles serve``, a real SGLang server, an sglang-router, or an ``AsyncEngine`` in this process.

Errors: invalid input raises ``EngineRequestError`` with ``status`` (the HTTP 4xx code, 400 for
in-process) and the server's ``message``. ``HttpEngineClient`` retries connection failures and
5xx answers with exponential backoff, then raises ``EngineConnectionError`` (no answer) or
``EngineRequestError`` (the last 5xx). Read timeouts are not retried: the request may be running.

Every call has a timeout, and every answer is read with a bound on its size
(``max_response_bytes``; a longer one raises ``EngineRequestError``): a broken or hostile server
can make Miles wait or fail, never hang or fill its memory. :func:`http_call` is the same for the
synchronous callers of ``miles.orchestrate`` (weight sync, health checks, the router).

``decode_routed_experts`` reads the ``meta_info.routed_experts`` of a response (rollout routing
replay), whichever engine answered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import httpx

    from miles.engine.async_engine import AsyncEngine

GenerateResult = dict[str, Any] | list[dict[str, Any]]

ADMIN_KEY_ENV = "MILES_ADMIN_API_KEY"
"""The environment variable that carries the admin key: ``miles serve`` reads it (so the key is
not on its command line, where ``ps`` shows it), and Miles's own admin calls (weight sync, memory
release) send it."""

DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024**2
# Answers are read undecoded, so their size bound holds: no compression bombs.
_IDENTITY = {"Accept-Encoding": "identity"}


def bearer(key: str | None) -> dict[str, str]:
    """The ``Authorization`` header for ``key`` (none for ``None``)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class HttpAnswer:
    """A whole HTTP answer: its status and its body (at most the caller's byte bound)."""

    status: int
    body: bytes

    def json(self) -> Any:
        """The body as JSON (``ValueError`` when it is not)."""
        return json.loads(self.body)

    def text(self, limit: int = 500) -> str:
        return self.body[:limit].decode("utf-8", errors="replace")


def http_call(
    method: str,
    url: str,
    payload: Mapping[str, Any] | None = None,
    *,
    key: str | None = None,
    timeout_s: float,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> HttpAnswer:
    """One synchronous HTTP call (a JSON ``payload`` if given) with a deadline of about
    ``timeout_s`` for the whole exchange and at most ``max_response_bytes`` read back.

    Raises ``httpx.HTTPError`` when no whole answer came in time (``httpx.ReadTimeout`` for a
    server that trickles past the deadline), ``EngineRequestError`` for a longer answer."""
    import httpx

    deadline = time.monotonic() + timeout_s
    with (
        httpx.Client(timeout=timeout_s) as client,
        client.stream(method, url, json=payload, headers={**bearer(key), **_IDENTITY}) as response,
    ):
        chunks, size = [], 0
        for chunk in response.iter_raw():
            size += len(chunk)
            if size > max_response_bytes:
                raise EngineRequestError(
                    f"answer larger than {max_response_bytes} bytes: not read", response.status_code, url
                )
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout(f"no whole answer within {timeout_s:.0f} s")
            chunks.append(chunk)
        return HttpAnswer(response.status_code, b"".join(chunks))


def decode_routed_experts(data: str, num_tokens: int, top_k: int) -> Any:
    """SGLang's ``meta_info.routed_experts`` (base64 of int32) as a numpy int32 array
    ``[num_tokens - 1, num_moe_layers, top_k]``; ``num_tokens`` = prompt + output tokens."""
    import numpy as np

    flat = np.frombuffer(base64.b64decode(data), dtype="<i4").astype(np.int32)
    rows = num_tokens - 1
    if rows < 0 or top_k < 1 or flat.size % max(rows * top_k, 1) or (rows == 0) != (flat.size == 0):
        raise ValueError(
            f"routed_experts has {flat.size} ids: not a whole [{rows}, layers, {top_k}] array "
            f"for {num_tokens} tokens"
        )
    return flat.reshape(rows, -1 if rows else 0, top_k)


class EngineRequestError(RuntimeError):
    """The engine refused or failed a request: ``status`` (HTTP code or None) and ``message``."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None) -> None:
        where = f" ({url})" if url else ""
        super().__init__(f"HTTP {status}{where}: {message}" if status else f"{message}{where}")
        self.status = status
        self.message = message
        self.url = url


class EngineConnectionError(EngineRequestError):
    """No answer from the engine within the retry budget."""


@runtime_checkable
class EngineClient(Protocol):
    """The rollout side's view of one engine (or a router in front of several)."""

    async def generate(self, payload: Mapping[str, Any]) -> GenerateResult:
        """One ``/generate`` body -> its response (a list for a batch or ``n > 1``)."""
        ...

    def generate_stream(self, payload: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Cumulative responses of one streamed prompt, the last one finished."""
        ...

    async def abort(self, rid: str | None = None) -> None:
        """Abort one request id, or all with ``None``."""
        ...

    async def flush_cache(self) -> bool: ...

    async def get_weight_version(self) -> str: ...

    async def health(self) -> bool: ...

    async def close(self) -> None: ...


def _message(raw: bytes) -> str:
    """The error message of an answer body (SGLang's and OpenAI's shapes, or its text)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:500].decode("utf-8", errors="replace")
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
    return json.dumps(body)[:500]


def _retry_after(response: httpx.Response) -> float:
    """Seconds a 503's ``Retry-After`` asks to wait (0 when absent or not a number)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0


class HttpEngineClient:
    """Async HTTP client of one engine URL: pooled keep-alive connections, timeouts, retries.

    ``max_retries`` extra attempts follow a failed connection or a 5xx answer, after
    ``backoff_s * 2**k`` seconds (at least a 503's ``Retry-After``; capped at ``max_backoff_s``).
    Answers are read up to ``max_response_bytes`` (each line of a stream too). One instance may
    be shared by many concurrent tasks of one event loop; ``close()`` releases the pool.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        health_timeout_s: float = 10.0,
        max_retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        max_connections: int = 256,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``timeout_s`` bounds each read of an answer (a generation can take long);
        ``health_timeout_s`` the whole ``/health`` check; ``transport`` replaces the network (tests)."""
        import httpx

        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.health_timeout_s = health_timeout_s
        self.max_response_bytes = max_response_bytes
        headers = {**bearer(api_key), **_IDENTITY}

        def make() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
                limits=httpx.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
                transport=transport,
            )

        self._make = make
        self._clients: dict[int, httpx.AsyncClient] = {}

    @property
    def _client(self) -> httpx.AsyncClient:
        """The connection pool of the running event loop: pooled connections belong to the loop
        that opened them, and the RL loop runs each rollout in a fresh ``asyncio.run``."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(id(loop))
        if client is None or client.is_closed or getattr(client, "_miles_loop", None) is not loop:
            # Pools of finished loops cannot be closed any more (their loop is gone): drop them.
            self._clients = {k: c for k, c in self._clients.items() if not c._miles_loop.is_closed()}  # type: ignore[attr-defined]
            client = self._clients[id(loop)] = self._make()
            client._miles_loop = loop  # type: ignore[attr-defined]
        return client

    async def request(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> Any:
        """Call any endpoint with retries; return the decoded JSON (or text) body."""
        _, body = await self._send(method, path, payload, stream=False)
        try:
            return json.loads(body)
        except ValueError:
            return body.decode("utf-8", errors="replace")

    async def _read(self, response: httpx.Response) -> bytes:
        """The whole body of ``response`` (then closed), refused past ``max_response_bytes``."""
        if response.is_stream_consumed:  # built in memory (a transport that is no network)
            body = response.content
            too_large = len(body) > self.max_response_bytes
        else:
            chunks, size = [], 0
            try:
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    if size > self.max_response_bytes:
                        break
                    chunks.append(chunk)
            finally:
                await response.aclose()
            body, too_large = b"".join(chunks), size > self.max_response_bytes
        if too_large:
            raise EngineRequestError(
                f"answer larger than {self.max_response_bytes} bytes: not read",
                response.status_code,
                str(response.url),
            )
        return body

    async def _send(
        self, method: str, path: str, payload: Mapping[str, Any] | None, *, stream: bool
    ) -> tuple[httpx.Response, bytes]:
        """A 2xx/3xx answer and its body; with ``stream`` the body is left unread (``b""``) for
        the caller, who closes the response."""
        import httpx

        url = f"{self.base_url}{path}"
        started = time.monotonic()
        last: str = ""
        retry_after = 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                backoff = max(self.backoff_s * 2 ** (attempt - 1), retry_after)
                await asyncio.sleep(min(backoff, self.max_backoff_s))
            try:
                request = self._client.build_request(method, path, json=payload)
                response = await self._client.send(request, stream=True)
                ok = response.status_code < 400
                body = b"" if ok and stream else await self._read(response)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                # The server went away mid-request (a crash): nothing came back, so asking again
                # (through a router: another engine; direct: the restarted one) loses nothing.
                last = f"{type(e).__name__}: {e}"
                continue
            if ok:
                return response, body
            message = _message(body)
            if response.status_code < 500:
                raise EngineRequestError(message, response.status_code, url)
            last = f"HTTP {response.status_code}: {message}"
            retry_after = _retry_after(response)  # a full engine says when to come back
            if attempt == self.max_retries:
                raise EngineRequestError(message, response.status_code, url)
        raise EngineConnectionError(
            f"no answer after {self.max_retries + 1} attempts in {time.monotonic() - started:.1f} s; last error: {last}",
            None,
            url,
        )

    async def generate(self, payload: Mapping[str, Any]) -> GenerateResult:
        result: GenerateResult = await self.request("POST", "/generate", payload)
        return result

    async def generate_stream(self, payload: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        response, _ = await self._send("POST", "/generate", {**payload, "stream": True}, stream=True)
        try:
            async for line in self._lines(response):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise EngineRequestError(_message_of(chunk), 500, f"{self.base_url}/generate")
                yield chunk
        finally:
            await response.aclose()

    async def _lines(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The lines of a streamed answer, each refused past ``max_response_bytes``."""
        pending: list[bytes] = []  # the pieces of the unfinished line
        size = 0
        async for chunk in response.aiter_raw():
            *ends, rest = chunk.split(b"\n")
            for end in ends:
                yield (b"".join(pending) + end).rstrip(b"\r")
                pending, size = [], 0
            pending.append(rest)
            size += len(rest)
            if size > self.max_response_bytes:
                raise EngineRequestError(
                    f"a streamed line longer than {self.max_response_bytes} bytes: not read",
                    response.status_code,
                    str(response.url),
                )
        if size:
            yield b"".join(pending)

    async def abort(self, rid: str | None = None) -> None:
        await self.request("POST", "/abort_request", {"abort_all": True} if rid is None else {"rid": rid})

    async def flush_cache(self) -> bool:
        try:
            await self.request("POST", "/flush_cache")
        except EngineRequestError as e:
            if e.status == 400:  # busy: the caller retries later
                return False
            raise
        return True

    async def get_weight_version(self) -> str:
        return str((await self.request("GET", "/get_weight_version"))["weight_version"])

    async def health(self) -> bool:
        import httpx

        async def check() -> bool:
            async with self._client.stream("GET", "/health") as response:  # the body is not read
                return response.status_code == 200

        try:
            return await asyncio.wait_for(check(), self.health_timeout_s)
        except (httpx.HTTPError, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._clients.pop(id(loop), None)
        if client is not None:
            await client.aclose()


def _message_of(chunk: Mapping[str, Any]) -> str:
    err = chunk.get("error")
    return str(err.get("message")) if isinstance(err, Mapping) else str(err)


class LocalEngineClient:
    """``EngineClient`` over an ``AsyncEngine`` in this process (no HTTP, same dicts).

    The caller owns the engine's lifecycle: ``close()`` here does not stop it.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def generate(self, payload: Mapping[str, Any]) -> GenerateResult:
        from miles.engine.async_engine import EngineOverloaded
        from miles.engine.engine import EngineStateError
        from miles.engine.protocol import BadRequest, run_generate

        try:
            return await run_generate(self.engine, payload)
        except BadRequest as e:
            raise EngineRequestError(str(e), 400) from None
        except (EngineOverloaded, EngineStateError) as e:  # the server's 503s
            raise EngineRequestError(str(e), 503) from None

    async def generate_stream(self, payload: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from miles.engine.async_engine import EngineOverloaded
        from miles.engine.engine import EngineStateError
        from miles.engine.protocol import generate_response, prepare_generate

        started = time.perf_counter()
        core = self.engine.engine
        try:
            req = await prepare_generate(self.engine, {**payload, "stream": True})
            stream = await self.engine.submit(req.specs)
        except ValueError as e:  # BadRequest is one
            raise EngineRequestError(str(e), 400) from None
        except (EngineOverloaded, EngineStateError) as e:
            raise EngineRequestError(str(e), 503) from None
        async for index, out in stream:
            yield generate_response(out, req.specs[index], req, core.tokenizer, started)

    async def abort(self, rid: str | None = None) -> None:
        await self.engine.abort(rid)

    async def flush_cache(self) -> bool:
        return await self.engine.call(lambda e: e.flush_cache())

    async def get_weight_version(self) -> str:
        return str(self.engine.engine.weight_version)

    async def health(self) -> bool:
        return self.engine.running

    async def close(self) -> None:
        return None

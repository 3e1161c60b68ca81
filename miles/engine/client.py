"""``EngineClient``: how rollout code talks to an engine, over HTTP or in process.

Both implementations take SGLang ``/generate`` bodies and return SGLang ``/generate`` response
dicts (see ``miles.engine.protocol``), so rollout code does not care whether the engine is
``miles serve``, a real SGLang server, an sglang-router, or an ``AsyncEngine`` in this process.

Errors: invalid input raises ``EngineRequestError`` with ``status`` (the HTTP 4xx code, 400 for
in-process) and the server's ``message``. ``HttpEngineClient`` retries connection failures and
5xx answers with exponential backoff, then raises ``EngineConnectionError`` (no answer) or
``EngineRequestError`` (the last 5xx). Read timeouts are not retried: the request may be running.

``decode_routed_experts`` reads the ``meta_info.routed_experts`` of a response (rollout routing
replay), whichever engine answered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import httpx

    from miles.engine.async_engine import AsyncEngine

GenerateResult = dict[str, Any] | list[dict[str, Any]]


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


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
    return json.dumps(body)[:500]


class HttpEngineClient:
    """Async HTTP client of one engine URL: pooled keep-alive connections, timeouts, retries.

    ``max_retries`` extra attempts follow a failed connection or a 5xx answer, after
    ``backoff_s * 2**k`` seconds (capped at ``max_backoff_s``). One instance may be shared by
    many concurrent tasks of one event loop; ``close()`` releases the pool.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (tests)."""
        import httpx

        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

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
        response = await self._send(method, path, payload, stream=False)
        try:
            return response.json()
        except ValueError:
            return response.text

    async def _send(
        self, method: str, path: str, payload: Mapping[str, Any] | None, *, stream: bool
    ) -> httpx.Response:
        import httpx

        url = f"{self.base_url}{path}"
        started = time.monotonic()
        last: str = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            try:
                request = self._client.build_request(method, path, json=payload)
                response = await self._client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                # The server went away mid-request (a crash): nothing came back, so asking again
                # (through a router: another engine; direct: the restarted one) loses nothing.
                last = f"{type(e).__name__}: {e}"
                continue
            if response.status_code < 400:
                return response
            if stream:
                await response.aread()
                await response.aclose()
            message = _message(response)
            if response.status_code < 500:
                raise EngineRequestError(message, response.status_code, url)
            last = f"HTTP {response.status_code}: {message}"
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
        response = await self._send("POST", "/generate", {**payload, "stream": True}, stream=True)
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise EngineRequestError(_message_of(chunk), 500, f"{self.base_url}/generate")
                yield chunk
        finally:
            await response.aclose()

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

        try:
            response = await self._client.get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

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
        from miles.engine.protocol import BadRequest, run_generate

        try:
            return await run_generate(self.engine, payload)
        except BadRequest as e:
            raise EngineRequestError(str(e), 400) from None

    async def generate_stream(self, payload: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from miles.engine.protocol import BadRequest, generate_response, parse_generate

        started = time.perf_counter()
        core = self.engine.engine
        try:
            req = parse_generate(
                {**payload, "stream": True},
                core.tokenizer,
                core.vocab_size,
                core.context_length,
                self.engine.new_request_id,
                moe=core.routing is not None,
            )
            stream = await self.engine.submit(req.specs)
        except (BadRequest, ValueError) as e:
            raise EngineRequestError(str(e), 400) from None
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

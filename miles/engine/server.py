"""HTTP server: SGLang's native API plus the OpenAI API over one ``AsyncEngine``.

This module assembles the app: the settings of the server (:class:`ServerConfig`, which holds the
engine's ``EngineConfig`` whole), who may call what, body limits, strict JSON, errors, and
``serve``. The routes live by concept: ``routes_native`` (SGLang's generation, info and cache
endpoints), ``routes_openai`` (``/v1/*``) and ``routes_admin`` (weights, memory, pause: typed
request models). FastAPI and uvicorn are imported by these four modules only, and lazily
(``create_app`` imports the routes, ``serve`` uvicorn). See docs/server.md for every endpoint and
for the threat model; in short:

- The server binds 127.0.0.1 by default. ``/health`` is open to all.
- *Admin* endpoints (``ADMIN_PATHS``: weight updates, update groups, memory release/resume,
  pause/continue, weight read-back) change or reveal what the engine serves. With an admin key
  (``--admin-api-key`` or ``$MILES_ADMIN_API_KEY``) they need ``Authorization: Bearer <admin
  key>`` from anywhere; without one they answer loopback clients only, and only when the
  ``Host`` header names loopback too (a DNS-rebinding page names its own host). The API key
  never opens them.
- With an API key (``--api-key``) every other endpoint needs it, or the admin key.
- A body is JSON or nothing: a body of another ``Content-Type``, or an admin POST without
  ``application/json``, gets 415 (a web page cannot send JSON to another origin without a CORS
  preflight, which this server never grants). Bodies are bounded (413): ``max_request_bytes``,
  and ``max_weight_update_bytes`` for ``/update_weights_from_tensor``. They are parsed here, as
  strict JSON, off the event loop when large.
- Nothing from the network is unpickled but shared-memory/CUDA-IPC tensor handles, through
  ``miles.engine.tensor_wire``'s allow-list, and only from callers on this host.

Every error is a JSON answer that leaves the keep-alive connection usable: 400 names the field,
503 says why (engine full, with ``Retry-After``; memory released), 500 is caught here rather
than by Starlette, whose handler re-raises into uvicorn, which then drops the connection.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from miles.config import EngineConfig
from miles.engine.async_engine import AsyncEngine, EngineOverloaded
from miles.engine.engine import Engine, EngineStateError
from miles.engine.protocol import BadRequest, RequestLimits, check_fields

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import Response, StreamingResponse

    from miles.engine.async_engine import RequestSpec, RequestStream

logger = logging.getLogger(__name__)
T = TypeVar("T")

ADMIN_PATHS = frozenset(
    {
        "/update_weights_from_disk",
        "/update_weights_from_tensor",
        "/init_weights_update_group",
        "/update_weights_from_distributed",
        "/destroy_weights_update_group",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/pause_generation",
        "/continue_generation",
        "/get_weights_by_name",
    }
)
# Endpoints whose body carries tensors: they get ``max_weight_update_bytes``.
WEIGHT_PATHS = frozenset({"/update_weights_from_tensor"})
_PARSE_IN_THREAD_BYTES = 1 << 20  # larger bodies are parsed off the event loop
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready (its requests were aborted)."""


class _BodyTooLarge(Exception):
    """The request body grew past its limit while it was read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body exceeds {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class ServerConfig:
    """What ``miles serve`` needs: the model, the address, the keys and the limits of the server,
    and the engine's settings whole (``engine``). The keys are left out of ``repr`` (logs) and of
    ``/get_server_info``."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    served_model_name: str | None = None
    dtype: str = "float32"
    device: str = "auto"  # "auto": the first CUDA device when there is one, else the CPU
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Limits (docs/server.md, "Limits"): what one client can make the server hold or do. How many
    # requests may wait is the engine's (EngineConfig.max_queued_requests).
    max_request_bytes: int = 32 * 1024**2
    max_weight_update_bytes: int = 1024**3
    max_requests_per_call: int = 1024  # engine requests (prompts x n) of one HTTP call
    weight_update_group_timeout_s: float = 120.0  # rendezvous of /init_weights_update_group

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_weight_update_bytes", "max_requests_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.weight_update_group_timeout_s > 0:
            raise ValueError(
                f"weight_update_group_timeout_s must be > 0, got {self.weight_update_group_timeout_s}"
            )
        for name in ("api_key", "admin_api_key"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty")
        if self.api_key is not None and self.api_key == self.admin_api_key:
            raise ValueError(
                "admin_api_key must differ from api_key (the API key must not open admin endpoints)"
            )
        client = [
            n for n in sorted(EngineConfig.client_fields()) if getattr(self.engine, n) != _ENGINE_DEFAULTS[n]
        ]
        if client:
            flags = ", ".join("--sglang-" + n.replace("_", "-") for n in client)
            raise ValueError(
                f"not settings of a server: {flags} (they set the rollout's client of the engines, in miles train)"
            )
        problems = self.engine.unimplemented()
        if problems:
            raise ValueError(f"not implemented by the built-in engine: {'; '.join(problems)}")

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(max_requests=self.max_requests_per_call)

    def info(self, engine: EngineConfig) -> dict[str, Any]:
        """What ``/get_server_info`` reports of the settings, flat as SGLang's server args: the
        server's (no keys) and ``engine``'s, the engine's configuration as resolved."""
        server = {k: v for k, v in vars(self).items() if k not in ("api_key", "admin_api_key", "engine")}
        return {**server, **{k: _plain(v) for k, v in vars(engine).items()}}


_ENGINE_DEFAULTS = vars(EngineConfig())


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def build_engine(config: ServerConfig) -> Engine:
    """The engine ``miles serve`` runs: the model on its device, the KV cache sized by
    ``config.engine`` (``max_total_tokens``, else from the memory: ``llm.standalone_config``)."""
    import torch

    from miles.engine.llm import standalone_config
    from miles.models.loading import load_model, load_tokenizer

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(config.model_path, dtype=config.dtype, device=device)
    tokenizer = load_tokenizer(config.model_path)
    return Engine(model, tokenizer, standalone_config(model, config.engine))


_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    503: "ServiceUnavailableError",
}


def _error(
    status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    from fastapi.responses import JSONResponse

    body = {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "InternalServerError"),
            "param": field,
            "code": status,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


# ---- who may call what (docs/server.md, "Threat model") --------------------------------------


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _loopback_host_header(value: bytes | None) -> bool:
    """The ``Host`` header names loopback (``localhost``, ``127.x``, ``[::1]``, any port).
    A page that rebinds its own DNS name to 127.0.0.1 still sends that name, so it fails."""
    if value is None:  # HTTP/1.0 without Host: no browser sends that
        return True
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return _is_loopback(host)


def same_host(scope: Mapping[str, Any]) -> bool:
    """The client is on this machine: a loopback address, or this server's own address (a
    colocated trainer that reaches the engine at the node's IP)."""
    client, server = scope.get("client"), scope.get("server")
    if not client:
        return False
    return _is_loopback(client[0]) or (server is not None and client[0] == server[0])


def _bearer(headers: dict[bytes, bytes], key: str) -> bool:
    return hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {key}".encode())


def _is_json(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.split(b";")[0].strip().lower() == b"application/json"


def body_limit(config: ServerConfig, path: str) -> int:
    """The most bytes a request body to ``path`` may have."""
    return config.max_weight_update_bytes if path in WEIGHT_PATHS else config.max_request_bytes


def refusal(config: ServerConfig, scope: Mapping[str, Any]) -> Response | None:
    """The answer that refuses this request before its body is read, or ``None`` to serve it."""
    if scope.get("path") == "/health":
        return None
    headers = dict(scope.get("headers") or [])
    return _unauthorized(config, scope, headers) or _unacceptable_body(config, scope, headers)


def _unauthorized(
    config: ServerConfig, scope: Mapping[str, Any], headers: dict[bytes, bytes]
) -> Response | None:
    path = scope.get("path", "")
    if config.admin_api_key is not None and _bearer(headers, config.admin_api_key):
        return None  # the admin key opens every endpoint
    if path in ADMIN_PATHS:
        if config.admin_api_key is not None:
            return _error(
                401,
                f"{path} is an admin endpoint: it needs the admin key (Authorization: Bearer <admin key>)",
            )
        client = scope.get("client")
        if not _is_loopback(client[0] if client else None):
            return _error(
                403, f"{path} is an admin endpoint: without --admin-api-key only loopback clients may call it"
            )
        if not _loopback_host_header(headers.get(b"host")):
            return _error(
                403,
                f"{path} is an admin endpoint: without --admin-api-key the Host header must name loopback (localhost, 127.0.0.1, [::1])",
            )
    if config.api_key is not None and not _bearer(headers, config.api_key):
        return _error(401, "missing or wrong API key (Authorization: Bearer <key>)")
    return None


def _unacceptable_body(
    config: ServerConfig, scope: Mapping[str, Any], headers: dict[bytes, bytes]
) -> Response | None:
    path = scope.get("path", "")
    length = headers.get(b"content-length", b"0").strip()
    has_body = length not in (b"0", b"") or b"transfer-encoding" in headers
    admin_post = path in ADMIN_PATHS and scope.get("method") == "POST"
    if (has_body or admin_post) and not _is_json(headers.get(b"content-type")):
        return _error(415, "the body must be JSON: send it with Content-Type: application/json")
    # A 413 keeps the connection: uvicorn discards the unread rest of the body, so the client
    # reads the answer (closing with data unread would reset the connection under its upload).
    limit = body_limit(config, path)
    if length.isdigit() and int(length) > limit:
        return _error(413, f"the request body has {int(length)} bytes; at most {limit}")
    return None


class Guard:
    """Plain ASGI middleware around the app (``BaseHTTPMiddleware`` would hide client
    disconnects): refuses what :func:`refusal` refuses, bounds the body as it is read, and turns
    any unexpected exception into a JSON 500 that keeps the connection open. (Starlette's own
    500 handler re-raises the exception after answering, so uvicorn closes the connection.)"""

    def __init__(self, inner: Any, config: ServerConfig) -> None:
        self.inner = inner
        self.config = config

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        denied = refusal(self.config, scope)
        if denied is not None:
            await denied(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = body_limit(self.config, path)
        received = 0
        started = False

        async def bounded_receive() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge(limit)
            return message

        async def tracked_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.inner(scope, bounded_receive, tracked_send)
        except Exception as exc:
            if started:  # a stream cut short: only closing the connection says so
                raise
            if isinstance(exc, _BodyTooLarge):
                answer = _error(413, str(exc))
            else:
                logger.exception("unhandled error on %s", path)
                answer = _error(500, f"{type(exc).__name__}: {exc}")
            await answer(scope, receive, send)


# ---- request bodies -------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise BadRequest(None, f"invalid JSON body: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(None, f"invalid JSON body: the number {text[:40]} is out of range")
    return value


def parse_json(raw: bytes) -> Any:
    """A request body as strict JSON (RFC 8259): UTF-8, no ``NaN``/``Infinity``, no number that
    overflows a float, no lone UTF-16 surrogate in a string, bounded nesting. ``BadRequest``
    otherwise, with the reason."""
    try:
        text = raw.decode("utf-8")  # strict: refuses encoded surrogates too
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
        if _LONE_SURROGATE_ESCAPE.search(text):  # only escapes can make one: check them
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except BadRequest:
        raise
    except UnicodeEncodeError:
        raise BadRequest(
            None, "invalid JSON body: a string holds a lone UTF-16 surrogate (not Unicode text)"
        ) from None
    except RecursionError:
        raise BadRequest(None, "invalid JSON body: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digits past the limit
        raise BadRequest(None, f"invalid JSON body: {e}") from None
    return data


# ---- what the routes share ----------------------------------------------------------------------


@dataclass
class ServerState:
    """What every route needs: the engine, the settings, and the request helpers (the body as
    strict JSON, cancellation on disconnect, control hooks, event streams). ``create_app`` puts
    one on ``app.state.miles``; a route gets it with :func:`state_of`."""

    engine: AsyncEngine
    config: ServerConfig
    started_at: float = field(default_factory=time.time)

    @property
    def core(self) -> Engine:
        """The engine itself: read its constant attributes only (its thread owns the rest)."""
        return self.engine.engine

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.config.model_path

    @property
    def limits(self) -> RequestLimits:
        return self.config.limits

    async def body(self, request: Request, known: frozenset[str] | None = None) -> dict[str, Any]:
        """The request's JSON object (an empty body is ``{}``), parsed strictly and, when large,
        on a worker thread; with ``known``, a field outside it is refused by name."""
        raw = await request.body()  # bounded by Guard
        if not raw or raw.isspace():
            data: Any = {}
        elif len(raw) < _PARSE_IN_THREAD_BYTES:
            data = parse_json(raw)
        else:
            data = await asyncio.to_thread(parse_json, raw)
        if not isinstance(data, dict):
            raise BadRequest(None, f"the body must be a JSON object, got {type(data).__name__}")
        if known is not None:
            check_fields(data, known)
        return data

    async def until_disconnect(self, request: Request, work: Awaitable[T]) -> T:
        """Await ``work``, cancelling it (which aborts its requests) if the client goes away.

        The body is read by then, so the next ASGI message is the disconnect: one waiting task
        per request, not a poll (polling every request five times a second starved the event
        loop, and ``/health`` with it, once thousands were queued)."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise ClientDisconnected()
        finally:
            task.cancel()
            watch.cancel()

    async def submit(self, specs: list[RequestSpec]) -> RequestStream:
        """Queue requests for streaming; the engine's own refusals (a rid in use) are 400s."""
        try:
            return await self.engine.submit(specs)
        except ValueError as e:
            raise BadRequest(None, str(e)) from None

    async def control(self, fn: Callable[[Engine], Any]) -> Response:
        """Run a control hook on the engine thread; engine refusals become 400 with the message.
        A dict the hook returns joins the answer."""
        from fastapi.responses import JSONResponse

        try:
            result = await self.engine.call(fn)
        except (ValueError, EngineStateError) as e:  # WeightUpdateError is a ValueError
            return JSONResponse({"success": False, "message": str(e)}, status_code=400)
        out = {"success": True, "message": "ok"}
        if isinstance(result, dict):
            out.update(result)
        return JSONResponse(out)

    @staticmethod
    def sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        """Server-sent events: one ``data:`` frame per chunk, then ``[DONE]``; a failure after
        the status went out is reported in-band."""
        from fastapi.responses import StreamingResponse

        async def frames() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except Exception as e:  # the status is already sent: report in-band, then end
                logger.exception("stream failed")
                yield f"data: {json.dumps({'error': {'message': str(e), 'code': 500}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")


def state_of(request: Request) -> ServerState:
    """The :class:`ServerState` of the app serving ``request``."""
    state: ServerState = request.app.state.miles
    return state


# ---- the app ------------------------------------------------------------------------------------


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI app over a started ``engine``: the routes of ``routes_native``,
    ``routes_openai`` and ``routes_admin`` behind :class:`Guard`, with every error a JSON answer.
    Closing the app (lifespan end) closes the engine."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    from miles.engine import routes_admin, routes_native, routes_openai

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="Miles engine", lifespan=lifespan)
    app.state.miles = ServerState(engine, config)
    app.add_middleware(Guard, config=config)

    async def bad_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BadRequest)
        return _error(400, str(exc), exc.field)

    async def http_error(request: Request, exc: Exception) -> Response:  # 404, 405: same shape
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    async def overloaded(request: Request, exc: Exception) -> Response:
        return _error(503, str(exc), headers={"Retry-After": "1"})

    async def unavailable(request: Request, exc: Exception) -> Response:
        return _error(503, str(exc))  # e.g. generating while memory is released

    async def gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    app.add_exception_handler(BadRequest, bad_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(EngineOverloaded, overloaded)
    app.add_exception_handler(EngineStateError, unavailable)
    app.add_exception_handler(ClientDisconnected, gone)
    for routes in (routes_native, routes_openai, routes_admin):
        app.include_router(routes.router)
    return app


def server_version() -> str:
    import miles

    return str(miles.__version__)


def serve(config: ServerConfig) -> None:
    """Load the model, start the engine thread and serve until interrupted (then shut down).

    With ``config.engine.enable_deterministic_inference`` the batch-invariant kernels are
    switched on first, for the whole process (the engine thread runs them)."""
    import uvicorn

    from miles.kernels.batch_invariant import set_batch_invariant

    level = config.engine.log_level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.engine.enable_deterministic_inference:
        set_batch_invariant(True)
    engine = AsyncEngine(build_engine(config)).start()
    try:
        app = create_app(engine, config)
        # What is loaded by now (torch, the model, the tokenizer) lives as long as the server: out
        # of the collector's sight, so a full collection under load walks only the requests'
        # objects (walking everything held the GIL, and /health with it).
        gc.collect()
        gc.freeze()
        logger.info("serving %s on http://%s:%d", config.model_path, config.host, config.port)
        uvicorn.run(app, host=config.host, port=config.port, log_level=level, access_log=False)
    finally:
        engine.close()

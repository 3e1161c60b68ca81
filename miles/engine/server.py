"""HTTP server: SGLang's native API plus the OpenAI API over one ``AsyncEngine``.

FastAPI and uvicorn are imported here only, and lazily (inside ``create_app``/``serve``). See
docs/server.md for every endpoint and for the threat model; in short:

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
  and ``max_weight_update_bytes`` for ``/update_weights_from_tensor``.
- Nothing from the network is unpickled but shared-memory/CUDA-IPC tensor handles, through
  ``miles.engine.tensor_wire``'s allow-list, and only from callers on this host.

Every error is a JSON answer that leaves the keep-alive connection usable: 400 names the field,
503 says why (engine full, with ``Retry-After``; memory released), 500 is caught here rather
than by Starlette, whose handler re-raises into uvicorn, which then drops the connection.
"""

import asyncio
import datetime
import gc
import hmac
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from miles.engine.async_engine import AsyncEngine, EngineOverloaded
from miles.engine.engine import Engine, EngineStateError
from miles.engine.openai_api import openai_response, openai_stream, prepare_openai
from miles.engine.protocol import (
    BadRequest,
    RequestLimits,
    check_fields,
    expect,
    generate_response,
    prepare_generate,
    run_generate,
)
from miles.engine.tensor_wire import MAX_NAME_CHARS, WireError, decode_named_tensors

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import Response

    from miles.engine.weights import UpdateGroup

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
_MAX_TENSORS = 100_000  # tensors in one update (more than any model has parameters)
_MAX_DIMS = 8
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
    """What ``miles serve`` needs: the model, the address, the keys, the limits and the engine's
    sizing. The keys are left out of ``repr`` (logs) and of ``/get_server_info``."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    served_model_name: str | None = None
    dtype: str = "float32"
    device: str = "auto"  # "auto": the first CUDA device when there is one, else the CPU
    max_total_tokens: int = 8192  # KV-cache capacity in tokens
    page_size: int = 16  # tokens per KV block
    max_running_requests: int = 256
    max_prefill_tokens: int = 4096
    context_length: int | None = None
    disable_radix_cache: bool = False
    random_seed: int | None = None
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False
    log_level: str = "info"
    # Limits (docs/server.md, "Limits"): what one client can make the server hold or do.
    max_request_bytes: int = 32 * 1024**2
    max_weight_update_bytes: int = 1024**3
    max_queued_requests: int = 4096  # beyond max_running_requests; then 503 + Retry-After
    max_requests_per_call: int = 1024  # engine requests (prompts x n) of one HTTP call
    weight_update_group_timeout_s: float = 120.0  # rendezvous of /init_weights_update_group

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_weight_update_bytes", "max_requests_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if not self.weight_update_group_timeout_s > 0:
            raise ValueError(
                f"weight_update_group_timeout_s must be > 0, got {self.weight_update_group_timeout_s}"
            )
        for name in ("api_key", "admin_api_key"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty")
        if self.api_key is not None and self.api_key == self.admin_api_key:
            raise ValueError("the admin key must differ from the API key")

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(max_requests=self.max_requests_per_call)


def build_engine(config: ServerConfig) -> Engine:
    import torch

    from miles.models.loading import load_model, load_tokenizer

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(config.model_path, dtype=config.dtype, device=device)
    tokenizer = load_tokenizer(config.model_path)
    return Engine(
        model,
        tokenizer,
        num_blocks=-(-config.max_total_tokens // config.page_size),
        block_size=config.page_size,
        max_running_requests=config.max_running_requests,
        max_num_batched_tokens=config.max_prefill_tokens,
        context_length=config.context_length,
        enable_prefix_caching=not config.disable_radix_cache,
        seed=config.random_seed,
        cuda_graph_max_bs=config.cuda_graph_max_bs,
        disable_cuda_graph=config.disable_cuda_graph,
        overlap_schedule=False if config.disable_overlap_schedule else None,
    )


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
) -> "Response":
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


def refusal(config: ServerConfig, scope: Mapping[str, Any]) -> "Response | None":
    """The answer that refuses this request before its body is read, or ``None`` to serve it."""
    if scope.get("path") == "/health":
        return None
    headers = dict(scope.get("headers") or [])
    return _unauthorized(config, scope, headers) or _unacceptable_body(config, scope, headers)


def _unauthorized(
    config: ServerConfig, scope: Mapping[str, Any], headers: dict[bytes, bytes]
) -> "Response | None":
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
) -> "Response | None":
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


# ---- weight-update groups --------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateGroupSpec:
    """A checked ``/init_weights_update_group`` body."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str


def parse_update_group(data: dict[str, Any]) -> UpdateGroupSpec:
    """Every field checked (type and range) before anything connects anywhere."""
    keys = ("master_address", "master_port", "rank_offset", "world_size", "group_name")
    values = [
        expect(data, k, str if k in ("master_address", "group_name") else int, None, what)
        for k, what in zip(keys, ("a host", "a port", "an integer", "an integer", "a string"))
    ]
    for k, v in zip(keys, values):
        if v is None:
            raise BadRequest(k, "is required")
    addr, port, offset, world, group = values
    backend = expect(data, "backend", str, "gloo", "'gloo' or 'nccl'")
    if not 0 < len(addr) <= 253 or any(c.isspace() or c in "/\x00" for c in addr):
        raise BadRequest("master_address", f"must be a host name or IP address, got {addr!r:.80}")
    if not 1 <= port <= 65535:
        raise BadRequest("master_port", f"must be a port in [1, 65535], got {port}")
    if not 2 <= world <= 65536:
        raise BadRequest("world_size", f"must be in [2, 65536] (the trainer and the engines), got {world}")
    if not 1 <= offset < world:
        raise BadRequest(
            "rank_offset", f"must be in [1, world_size) = [1, {world}) (rank 0 is the trainer), got {offset}"
        )
    if not 0 < len(group) <= 256:
        raise BadRequest("group_name", f"must have 1 to 256 characters, got {len(group)}")
    if backend not in ("gloo", "nccl"):
        raise BadRequest("backend", f"must be 'gloo' or 'nccl', got {backend!r}")
    return UpdateGroupSpec(addr, port, offset, world, group, backend)


def join_update_group(spec: UpdateGroupSpec, timeout_s: float, device: Any) -> "UpdateGroup":
    """The rendezvous of ``spec`` (blocking: call it on a worker thread), bounded by ``timeout_s``."""
    import torch

    from miles.engine.weights import init_custom_process_group

    if spec.backend == "nccl":
        torch.cuda.set_device(device)  # this worker thread's current device is the engine's
    timeout = datetime.timedelta(seconds=timeout_s)
    return init_custom_process_group(
        spec.master_address, spec.master_port, spec.rank_offset, spec.world_size, spec.group_name,
        spec.backend, timeout=timeout,
    )  # fmt: skip


def check_broadcast(names: list[Any], dtypes: list[Any], shapes: list[Any], max_bytes: int) -> None:
    """``/update_weights_from_distributed``'s tensor list: names, known dtypes, shapes of
    non-negative ints, at most ``max_bytes`` in all (the engine allocates them to receive)."""
    import torch

    from miles.engine.weights import parse_dtype

    if not len(names) == len(dtypes) == len(shapes):
        raise BadRequest(
            "names", f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})"
        )
    if len(names) > _MAX_TENSORS:
        raise BadRequest("names", f"{len(names)} tensors in one update: at most {_MAX_TENSORS}")
    total = 0
    for i, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise BadRequest("names", f"entry {i} must be a name of 1 to {MAX_NAME_CHARS} characters")
        try:
            size = torch.empty((), dtype=parse_dtype(dtype)).element_size() if isinstance(dtype, str) else 0
        except (ValueError, TypeError, RuntimeError):  # not a dtype, or one torch cannot allocate
            size = 0
        if not size:
            raise BadRequest("dtypes", f"entry {i} is not a torch dtype name: {dtype!r:.40}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise BadRequest("shapes", f"entry {i} must be a list of at most {_MAX_DIMS} sizes >= 0")
        total += math.prod(shape) * size
        if total > max_bytes:
            raise BadRequest("shapes", f"the tensors exceed {max_bytes} bytes (--max-weight-update-bytes)")


def create_app(engine: AsyncEngine, config: ServerConfig) -> "FastAPI":
    """The FastAPI app over a started ``engine``; closing the app (lifespan end) closes it.

    (No ``from __future__ import annotations`` in this module: FastAPI reads the handlers'
    annotations, and ``Request`` is imported here, lazily, not at module level.)
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from miles.engine.async_engine import RequestSpec, RequestStream

    core = engine.engine
    tokenizer = core.tokenizer
    model_name = config.served_model_name or config.model_path
    limits = config.limits
    started_at = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="Miles engine", lifespan=lifespan)
    app.add_middleware(Guard, config=config)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return _error(400, str(exc), exc.field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:  # 404, 405: same shape
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(EngineOverloaded)
    async def overloaded(request: Request, exc: EngineOverloaded) -> Response:
        return _error(503, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(EngineStateError)
    async def unavailable(request: Request, exc: EngineStateError) -> Response:
        return _error(503, str(exc))  # e.g. generating while memory is released

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    async def body(request: Request, known: frozenset[str] | None = None) -> dict[str, Any]:
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

    async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
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

    async def control(fn: Callable[[Engine], Any]) -> Response:
        """Run a control hook on the engine thread; engine refusals become 400 with the message."""
        try:
            result = await engine.call(fn)
        except (ValueError, EngineStateError) as e:  # WeightUpdateError is a ValueError
            return JSONResponse({"success": False, "message": str(e)}, status_code=400)
        out = {"success": True, "message": "ok"}
        if isinstance(result, dict):
            out.update(result)
        return JSONResponse(out)

    def sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def frames() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except Exception as e:  # the status is already sent: report in-band, then end
                logger.exception("stream failed")
                yield f"data: {json.dumps({'error': {'message': str(e), 'code': 500}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    # ---- health and info -------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse(
            {"status": "ok"} if engine.running else {"status": "down"},
            status_code=200 if engine.running else 503,
        )

    @app.get("/health_generate")
    async def health_generate() -> Response:
        from miles.types import SamplingParams

        spec = RequestSpec([0], SamplingParams(max_new_tokens=1, temperature=0.0), engine.new_request_id())
        await asyncio.wait_for(engine.generate([spec]), timeout=60)
        return JSONResponse({"status": "ok"})

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info() -> Response:
        return JSONResponse(
            {
                "model_path": config.model_path,
                "tokenizer_path": config.model_path,
                "is_generation": True,
                "served_model_name": model_name,
                "weight_version": core.weight_version,
                "vocab_size": core.vocab_size,
                "context_length": core.context_length,
            }
        )

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info() -> Response:
        stats = await engine.stats()
        args = {k: v for k, v in asdict(config).items() if k not in ("api_key", "admin_api_key")}
        return JSONResponse(
            {
                **args,
                "engine": "miles",
                "version": _version(),
                "weight_version": core.weight_version,
                "uptime_s": time.time() - started_at,
                "internal_states": [asdict(stats)],
            }
        )

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(request: Request) -> Response:
        """SGLang's weight read-back: the first ``truncate_size`` rows of parameter ``name`` as
        (nested) float lists. Trainers use it to check a weight sync."""
        data = await body(request, frozenset({"name", "truncate_size"}))
        name = expect(data, "name", str, None, "a parameter name")
        if not name:
            raise BadRequest("name", "is required")
        size = expect(data, "truncate_size", int, 100, "an integer")
        if size < 1:
            raise BadRequest("truncate_size", f"must be >= 1, got {size}")

        def read(e: Engine) -> Any:
            if "weights" in e._released:
                raise EngineStateError("weights are released: resume_memory_occupation(['weights']) first")
            params = dict(e.model.named_parameters(remove_duplicate=False))
            if name not in params:
                raise ValueError(f"no parameter named {name!r}")
            return params[name].detach()[:size].float().cpu().tolist()

        try:
            values = await engine.call(read)
        except (ValueError, EngineStateError) as e:
            return JSONResponse({"success": False, "message": str(e)}, status_code=400)
        return JSONResponse(values)

    @app.get("/get_weight_version")
    async def get_weight_version() -> Response:
        return JSONResponse({"weight_version": core.weight_version})

    @app.get("/metrics")
    async def metrics() -> Response:
        s = await engine.stats()
        lines = []
        for name, kind, value, help_ in (
            ("num_running_reqs", "gauge", s.num_running, "requests being decoded"),
            ("num_queue_reqs", "gauge", s.num_waiting, "requests waiting for KV blocks"),
            ("token_usage", "gauge", s.kv_usage, "fraction of KV blocks in use"),
            ("num_free_blocks", "gauge", s.num_free_blocks, "free KV blocks"),
            ("generation_tokens_total", "counter", engine.generated_tokens_total, "tokens generated"),
            ("prompt_tokens_total", "counter", engine.prompt_tokens_total, "prompt tokens received"),
            ("num_requests_total", "counter", engine.requests_total, "requests received"),
            ("cached_tokens_total", "counter", s.total_cached_tokens, "prompt tokens served from cache"),
            ("gen_throughput", "gauge", engine.token_throughput(), "generated tokens/s, last 10 s"),
        ):
            lines += [f"# HELP sglang:{name} {help_}", f"# TYPE sglang:{name} {kind}"]
            lines.append(f'sglang:{name}{{model_name="{model_name}"}} {float(value)}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ---- generation --------------------------------------------------------------------------

    async def submit(specs: list[RequestSpec]) -> RequestStream:
        try:
            return await engine.submit(specs)
        except ValueError as e:  # the engine's own checks (e.g. a rid already in use)
            raise BadRequest(None, str(e)) from None

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        payload = await body(request)
        if not payload.get("stream"):
            return JSONResponse(await until_disconnect(request, run_generate(engine, payload, limits)))
        started = time.perf_counter()
        req = await prepare_generate(engine, payload, limits)
        stream = await submit(req.specs)

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            async for index, out in stream:
                yield generate_response(out, req.specs[index], req, tokenizer, started)

        return sse(chunks())

    async def openai(request: Request, chat: bool) -> Response:
        req = await prepare_openai(await body(request), engine, chat=chat, model=model_name, limits=limits)
        if not req.stream:
            outs = await until_disconnect(request, engine.generate(req.specs))
            return JSONResponse(openai_response(req, outs, tokenizer))
        stream = await submit(req.specs)
        return sse(openai_stream(req, stream, tokenizer))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await openai(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await openai(request, chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        card = {
            "id": model_name,
            "object": "model",
            "created": int(started_at),
            "owned_by": "miles",
            "root": config.model_path,
        }
        return JSONResponse({"object": "list", "data": [card]})

    # ---- control plane -----------------------------------------------------------------------

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        if await engine.call(lambda e: e.flush_cache()):
            return JSONResponse({"success": True, "message": "cache flushed"})
        return JSONResponse(
            {"success": False, "message": "requests are in flight; try again when idle"}, status_code=400
        )

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        data = await body(request, frozenset({"rid", "abort_all"}))
        rid = expect(data, "rid", str, None, "a string")
        if not expect(data, "abort_all", bool, False, "true or false") and rid is None:
            raise BadRequest("rid", "give rid or abort_all: true")
        aborted = await engine.abort(None if rid is None else rid)
        return JSONResponse({"success": True, "aborted": aborted})

    @app.post("/pause_generation")
    async def pause_generation(request: Request) -> Response:
        mode = expect(await body(request, frozenset({"mode"})), "mode", str, "abort", "'abort' or 'in_place'")
        if mode not in ("abort", "in_place"):  # SGLang's "retract" is not implemented
            raise BadRequest("mode", f"must be 'abort' or 'in_place', got {mode!r}")
        return await control(lambda e: e.pause_generation(mode))

    @app.post("/continue_generation")
    async def continue_generation(request: Request) -> Response:
        await body(request, frozenset())
        return await control(lambda e: e.continue_generation())

    def versioned(data: dict[str, Any]) -> tuple[str | None, bool]:
        version = data.get("weight_version")
        if version is not None and not isinstance(version, (str, int)):
            raise BadRequest("weight_version", f"must be a string, got {version!r}")
        flush = expect(data, "flush_cache", bool, True, "true or false")
        return (None if version is None else str(version)), flush

    def with_version(fn: Callable[[Engine], None]) -> Callable[[Engine], dict[str, Any]]:
        def run(e: Engine) -> dict[str, Any]:
            fn(e)
            return {"weight_version": e.weight_version}

        return run

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Response:
        data = await body(
            request,
            frozenset({"model_path", "load_format", "weight_version", "flush_cache", "abort_all_requests"}),
        )
        path = expect(data, "model_path", str, None, "a path")
        if not path:
            raise BadRequest("model_path", "is required")
        version, flush = versioned(data)
        return await control(with_version(lambda e: e.update_weights_from_disk(path, version, flush)))

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request) -> Response:
        data = await body(
            request,
            frozenset(
                {
                    "serialized_named_tensors",
                    "load_format",
                    "flush_cache",
                    "weight_version",
                    "abort_all_requests",
                }
            ),
        )
        if data.get("load_format") not in (None, "direct"):
            raise BadRequest(
                "load_format", f"only null or 'direct' is supported, got {data['load_format']!r}"
            )
        try:  # shared-memory / CUDA-IPC handles only mean something to a caller on this host
            named = await asyncio.to_thread(
                decode_named_tensors,
                data.get("serialized_named_tensors"),
                allow_shared=same_host(request.scope),
                max_bytes=config.max_weight_update_bytes,
                max_tensors=_MAX_TENSORS,
            )
        except WireError as e:
            raise BadRequest("serialized_named_tensors", str(e)) from None
        version, flush = versioned(data)
        return await control(with_version(lambda e: e.update_weights_from_tensors(named, version, flush)))

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request) -> Response:
        """The rendezvous runs on a worker thread, bounded by ``weight_update_group_timeout_s``:
        generation goes on meanwhile, and an unreachable trainer costs a 400, not a frozen engine."""
        keys = ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")
        spec = parse_update_group(await body(request, frozenset(keys)))
        if spec.backend == "nccl" and core.model.device.type != "cuda":
            raise BadRequest("backend", "'nccl' needs an engine on a CUDA device; use 'gloo'")
        if await engine.call(lambda e: e.has_weights_update_group(spec.group_name)):
            raise BadRequest("group_name", f"weights update group {spec.group_name!r} already exists")
        timeout_s = config.weight_update_group_timeout_s
        try:
            group = await asyncio.to_thread(join_update_group, spec, timeout_s, core.model.device)
        except Exception as e:  # torch's DistStoreError/DistNetworkError, a refused connection, ...
            where = f"{spec.master_address}:{spec.master_port}"
            message = f"cannot join weights update group {spec.group_name!r} at {where} within {timeout_s:g} s: {type(e).__name__}: {e}"
            return JSONResponse({"success": False, "message": message}, status_code=400)
        return await control(lambda e: e.add_weights_update_group(spec.group_name, group))

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> Response:
        keys = {"names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version", "load_format"}
        data = await body(request, frozenset(keys))
        names, dtypes, shapes = (expect(data, k, list, None, "a list") for k in ("names", "dtypes", "shapes"))
        group = expect(data, "group_name", str, None, "a string")
        for key, value in (("names", names), ("dtypes", dtypes), ("shapes", shapes), ("group_name", group)):
            if value is None:
                raise BadRequest(key, "is required")
        check_broadcast(names, dtypes, shapes, config.max_weight_update_bytes)
        version, flush = versioned(data)
        return await control(
            with_version(
                lambda e: e.update_weights_from_distributed(names, dtypes, shapes, group, version, flush)
            )
        )

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request) -> Response:
        group = expect(await body(request, frozenset({"group_name"})), "group_name", str, None, "a string")
        if group is None:
            raise BadRequest("group_name", "is required")
        return await control(lambda e: e.destroy_weights_update_group(group))

    def tags_of(data: dict[str, Any]) -> list[str] | None:
        tags = expect(data, "tags", list, None, "a list of 'weights' / 'kv_cache'")
        if tags is not None and not all(isinstance(t, str) for t in tags):
            raise BadRequest("tags", "must be a list of strings")
        return tags

    @app.post("/release_memory_occupation")
    async def release_memory_occupation(request: Request) -> Response:
        tags = tags_of(await body(request, frozenset({"tags"})))
        return await control(lambda e: e.release_memory_occupation(tags))

    @app.post("/resume_memory_occupation")
    async def resume_memory_occupation(request: Request) -> Response:
        tags = tags_of(await body(request, frozenset({"tags"})))
        return await control(lambda e: e.resume_memory_occupation(tags))

    return app


def _version() -> str:
    import miles

    return str(miles.__version__)


def serve(config: ServerConfig) -> None:
    """Load the model, start the engine thread and serve until interrupted (then shut down)."""
    import uvicorn

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = AsyncEngine(build_engine(config), max_queued_requests=config.max_queued_requests).start()
    try:
        app = create_app(engine, config)
        # What is loaded by now (torch, the model, the tokenizer) lives as long as the server: out
        # of the collector's sight, so a full collection under load walks only the requests'
        # objects (walking everything held the GIL, and /health with it, for most of a second).
        gc.collect()
        gc.freeze()
        logger.info("serving %s on http://%s:%d", config.model_path, config.host, config.port)
        uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, access_log=False)
    finally:
        engine.close()

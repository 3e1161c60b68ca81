"""HTTP server: SGLang's native API plus the OpenAI API over one ``AsyncEngine``.

FastAPI and uvicorn are imported here only, and lazily (inside ``create_app``/``serve``), so
importing this module is cheap. See docs/server.md for every endpoint.

Security: the server binds 127.0.0.1 by default. With ``api_key`` set, every endpoint except
``/health`` needs ``Authorization: Bearer <key>`` (401 otherwise). *Admin* endpoints (weight
updates, update groups, memory release/resume, pause/continue) change what the engine serves;
with a key they need the same key, and without one they are allowed only from loopback clients
(403 otherwise) unless ``allow_remote_admin`` is set (for trainers on other hosts).
"""

import asyncio
import base64
import io
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from miles.engine.async_engine import AsyncEngine
from miles.engine.engine import Engine, EngineStateError
from miles.engine.openai_api import openai_response, openai_stream, parse_openai
from miles.engine.protocol import (
    BadRequest,
    check_fields,
    expect,
    generate_response,
    parse_generate,
    run_generate,
)

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import Response

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


class ClientDisconnected(Exception):
    """The client went away before its answer was ready (its requests were aborted)."""


@dataclass(frozen=True)
class ServerConfig:
    """What ``miles serve`` needs: the model, the address, and the engine's sizing."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    allow_remote_admin: bool = False
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


def _error(status: int, message: str, field: str | None = None) -> "Response":
    from fastapi.responses import JSONResponse

    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError"}
    body = {
        "error": {
            "message": message,
            "type": kind.get(status, "InternalServerError"),
            "param": field,
            "code": status,
        }
    }
    return JSONResponse(body, status_code=status)


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _decode_named_tensors(data: Any) -> list[tuple[str, Any]]:
    """``serialized_named_tensors`` of ``/update_weights_from_tensor``: one string per TP rank
    (the built-in engine has one rank), each base64 of ``[(name, tensor), ...]`` either saved by
    ``torch.save`` (a zip archive: loaded with ``weights_only``) or pickled by
    ``torch.multiprocessing`` as SGLang's ``MultiprocessingSerializer`` does (CUDA IPC handles,
    shared-memory CPU tensors: a colocated trainer hands its tensors over without copying them
    through HTTP). The pickle is trusted like every weight-update endpoint: loopback or API key."""
    import torch

    if isinstance(data, list):
        if len(data) != 1:
            raise BadRequest("serialized_named_tensors", f"one entry (tp_size 1) expected, got {len(data)}")
        data = data[0]
    if not isinstance(data, str):
        raise BadRequest("serialized_named_tensors", "must be a base64 string (or a list of one)")
    try:
        raw = base64.b64decode(data, validate=True)
        if raw[:2] == b"PK":  # torch.save's zip archive
            named = torch.load(io.BytesIO(raw), weights_only=True)
        else:
            import pickle

            import torch.multiprocessing

            named = pickle.loads(raw)
    except Exception as e:
        raise BadRequest("serialized_named_tensors", f"cannot decode: {type(e).__name__}: {e}") from None
    if isinstance(named, dict):
        named = list(named.items())
    if not isinstance(named, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in named):
        raise BadRequest("serialized_named_tensors", "must hold a list of (name, tensor) pairs")
    return [(str(n), t) for n, t in named]


def create_app(engine: AsyncEngine, config: ServerConfig) -> "FastAPI":
    """The FastAPI app over a started ``engine``; closing the app (lifespan end) closes it.

    (No ``from __future__ import annotations`` in this module: FastAPI reads the handlers'
    annotations, and ``Request`` is imported here, lazily, not at module level.)
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    core = engine.engine
    tokenizer = core.tokenizer
    model_name = config.served_model_name or config.model_path
    started_at = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="Miles engine", lifespan=lifespan)

    def refusal(scope: dict[str, Any]) -> Response | None:
        path = scope.get("path", "")
        if config.api_key is not None and path != "/health":
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization", b"") != f"Bearer {config.api_key}".encode():
                return _error(401, "missing or wrong API key (Authorization: Bearer <key>)")
        elif path in ADMIN_PATHS and not config.allow_remote_admin:
            client = scope.get("client")
            if not _is_loopback(client[0] if client else None):
                return _error(403, f"{path} is admin-only: call it from loopback or start with --api-key")
        return None

    class Guard:
        """Auth check as a plain ASGI middleware (``BaseHTTPMiddleware`` would hide client
        disconnects from ``Request.is_disconnected``, which abort-on-disconnect relies on)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            denied = refusal(scope) if scope["type"] == "http" else None
            if denied is not None:
                await denied(scope, receive, send)
            else:
                await self.inner(scope, receive, send)

    app.add_middleware(Guard)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return _error(400, str(exc), exc.field)

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return _error(500, f"{type(exc).__name__}: {exc}")

    async def body(request: Request, known: frozenset[str] | None = None) -> dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            data: Any = {}
        else:
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(None, f"invalid JSON body: {e}") from None
        if not isinstance(data, dict):
            raise BadRequest(None, f"the body must be a JSON object, got {type(data).__name__}")
        if known is not None:
            check_fields(data, known)
        return data

    async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
        """Await ``work``, cancelling it (which aborts its requests) if the client goes away."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.2)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    raise ClientDisconnected()
        finally:
            task.cancel()

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
        from miles.engine.async_engine import RequestSpec
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
        args = {k: v for k, v in asdict(config).items() if k != "api_key"}
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

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        payload = await body(request)
        logger.debug("/generate %s", payload)
        if not payload.get("stream"):
            return JSONResponse(await until_disconnect(request, run_generate(engine, payload)))
        started = time.perf_counter()
        req = parse_generate(
            payload,
            tokenizer,
            core.vocab_size,
            core.context_length,
            engine.new_request_id,
            moe=core.routing is not None,
        )
        try:
            stream = await engine.submit(req.specs)
        except ValueError as e:
            raise BadRequest(None, str(e)) from None

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            async for index, out in stream:
                yield generate_response(out, req.specs[index], req, tokenizer, started)

        return sse(chunks())

    async def openai(request: Request, chat: bool) -> Response:
        req = parse_openai(await body(request), engine, chat=chat, model=model_name)
        if not req.stream:
            outs = await until_disconnect(request, engine.generate(req.specs))
            return JSONResponse(openai_response(req, outs, tokenizer))
        stream = await engine.submit(req.specs)
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
        named = _decode_named_tensors(data.get("serialized_named_tensors"))
        version, flush = versioned(data)
        return await control(with_version(lambda e: e.update_weights_from_tensors(named, version, flush)))

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request) -> Response:
        keys = ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")
        data = await body(request, frozenset(keys))
        addr = expect(data, "master_address", str, None, "a host")
        port, offset, world = (expect(data, k, int, None, "an integer") for k in keys[1:4])
        group = expect(data, "group_name", str, None, "a string")
        backend = expect(data, "backend", str, "gloo", "'gloo' or 'nccl'")
        missing = [k for k, v in zip(keys, (addr, port, offset, world, group)) if v is None]
        if missing:
            raise BadRequest(missing[0], "is required")
        return await control(lambda e: e.init_weights_update_group(addr, port, offset, world, group, backend))

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> Response:
        keys = {"names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version", "load_format"}
        data = await body(request, frozenset(keys))
        names, dtypes, shapes = (expect(data, k, list, None, "a list") for k in ("names", "dtypes", "shapes"))
        group = expect(data, "group_name", str, None, "a string")
        for key, value in (("names", names), ("dtypes", dtypes), ("shapes", shapes), ("group_name", group)):
            if value is None:
                raise BadRequest(key, "is required")
        if not len(names) == len(dtypes) == len(shapes):
            raise BadRequest(
                "names",
                f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})",
            )
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
    engine = AsyncEngine(build_engine(config)).start()
    try:
        app = create_app(engine, config)
        logger.info("serving %s on http://%s:%d", config.model_path, config.host, config.port)
        uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, access_log=False)
    finally:
        engine.close()

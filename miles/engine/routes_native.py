"""SGLang's native endpoints: generation, health, info, metrics, the prefix cache and aborts.

The routes of the app ``miles.engine.server.create_app`` assembles; they reach the engine and the
request helpers through ``state_of(request)``. Field names and shapes follow SGLang
(``miles.engine.protocol``). None of them is an admin endpoint (``routes_admin``): they need the
API key when the server has one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from miles.engine.async_engine import RequestSpec
from miles.engine.protocol import BadRequest, generate_response, parse_request, prepare_generate, run_generate
from miles.engine.server import server_version, state_of
from miles.types import SamplingParams

router = APIRouter()


# ---- health and info --------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request) -> Response:
    running = state_of(request).engine.running
    return JSONResponse({"status": "ok" if running else "down"}, status_code=200 if running else 503)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """One greedy token through the whole engine (bounded by a minute)."""
    engine = state_of(request).engine
    spec = RequestSpec([0], SamplingParams(max_new_tokens=1, temperature=0.0), engine.new_request_id())
    await asyncio.wait_for(engine.generate([spec]), timeout=60)
    return JSONResponse({"status": "ok"})


@router.get("/get_model_info")
@router.get("/model_info")
async def model_info(request: Request) -> Response:
    s = state_of(request)
    return JSONResponse(
        {
            "model_path": s.config.model_path,
            "tokenizer_path": s.config.model_path,
            "is_generation": True,
            "served_model_name": s.model_name,
            "weight_version": s.core.weight_version,
            "vocab_size": s.core.vocab_size,
            "context_length": s.core.context_length,
        }
    )


@router.get("/get_server_info")
@router.get("/server_info")
async def server_info(request: Request) -> Response:
    """The settings, flat as SGLang's server args (the server's, no keys; the engine's
    ``EngineConfig`` as it runs, derived values filled in), and the engine's state."""
    s = state_of(request)
    stats = await s.engine.stats()
    return JSONResponse(
        {
            **s.config.info(s.core.config),
            "engine": "miles",
            "version": server_version(),
            "weight_version": s.core.weight_version,
            "uptime_s": time.time() - s.started_at,
            "internal_states": [asdict(stats)],
        }
    )


@router.get("/get_weight_version")
async def get_weight_version(request: Request) -> Response:
    return JSONResponse({"weight_version": state_of(request).core.weight_version})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text, SGLang's metric names."""
    s = state_of(request)
    engine, stats = s.engine, await s.engine.stats()
    lines = []
    for name, kind, value, help_ in (
        ("num_running_reqs", "gauge", stats.num_running, "requests being decoded"),
        ("num_queue_reqs", "gauge", stats.num_waiting, "requests waiting for KV blocks"),
        ("token_usage", "gauge", stats.kv_usage, "fraction of KV blocks in use"),
        ("num_free_blocks", "gauge", stats.num_free_blocks, "free KV blocks"),
        ("generation_tokens_total", "counter", engine.generated_tokens_total, "tokens generated"),
        ("prompt_tokens_total", "counter", engine.prompt_tokens_total, "prompt tokens received"),
        ("num_requests_total", "counter", engine.requests_total, "requests received"),
        ("cached_tokens_total", "counter", stats.total_cached_tokens, "prompt tokens served from cache"),
        ("gen_throughput", "gauge", engine.token_throughput(), "generated tokens/s, last 10 s"),
    ):
        lines += [f"# HELP sglang:{name} {help_}", f"# TYPE sglang:{name} {kind}"]
        lines.append(f'sglang:{name}{{model_name="{s.model_name}"}} {float(value)}')
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


# ---- generation --------------------------------------------------------------------------------


@router.post("/generate")
async def generate(request: Request) -> Response:
    s = state_of(request)
    payload = await s.body(request)
    if not payload.get("stream"):
        return JSONResponse(await s.until_disconnect(request, run_generate(s.engine, payload, s.limits)))
    started = time.perf_counter()
    req = await prepare_generate(s.engine, payload, s.limits)
    stream = await s.submit(req.specs)
    tokenizer = s.core.tokenizer

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        async for index, out in stream:
            yield generate_response(out, req.specs[index], req, tokenizer, started)

    return s.sse(chunks())


# ---- the prefix cache and aborts ----------------------------------------------------------------


@dataclass(frozen=True)
class AbortRequest:
    """``/abort_request``: one request by ``rid``, or every one with ``abort_all``."""

    rid: str | None = None
    abort_all: bool = False

    def __post_init__(self) -> None:
        if self.rid is None and not self.abort_all:
            raise BadRequest("rid", "give rid or abort_all: true")


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> Response:
    if await state_of(request).engine.call(lambda e: e.flush_cache()):
        return JSONResponse({"success": True, "message": "cache flushed"})
    return JSONResponse(
        {"success": False, "message": "requests are in flight; try again when idle"}, status_code=400
    )


@router.post("/abort_request")
async def abort_request(request: Request) -> Response:
    s = state_of(request)
    req = parse_request(AbortRequest, await s.body(request))
    aborted = await s.engine.abort(req.rid)
    return JSONResponse({"success": True, "aborted": aborted})

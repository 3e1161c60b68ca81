"""The OpenAI API over the engine: ``/v1/completions``, ``/v1/chat/completions`` (streamed too)
and ``/v1/models``. Request parsing and response shapes are ``miles.engine.openai_api``'s; these
are the routes ``miles.engine.server.create_app`` mounts.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from miles.engine.openai_api import openai_response, openai_stream, prepare_openai
from miles.engine.server import state_of

router = APIRouter()


async def _complete(request: Request, chat: bool) -> Response:
    s = state_of(request)
    body = await s.body(request)
    req = await prepare_openai(body, s.engine, chat=chat, model=s.model_name, limits=s.limits)
    if not req.stream:
        outs = await s.until_disconnect(request, s.engine.generate(req.specs))
        return JSONResponse(openai_response(req, outs, s.core.tokenizer))
    stream = await s.submit(req.specs)
    return s.sse(openai_stream(req, stream, s.core.tokenizer))


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


@router.get("/v1/models")
async def models(request: Request) -> Response:
    s = state_of(request)
    card = {
        "id": s.model_name,
        "object": "model",
        "created": int(s.started_at),
        "owned_by": "miles",
        "root": s.config.model_path,
    }
    return JSONResponse({"object": "list", "data": [card]})

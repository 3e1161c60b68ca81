"""``HttpEngineClient`` and ``LocalEngineClient``: the same scenario gives the same answers;
retries on connection errors and 5xx; 4xx raises ``EngineRequestError`` with the message."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

from miles.engine.client import (
    EngineClient,
    EngineConnectionError,
    EngineRequestError,
    HttpEngineClient,
    LocalEngineClient,
)
from tests.engine.conftest import ThreadServer, free_port
from tests.tolerance import logprob_tol

SCENARIO: list[dict[str, Any]] = [
    {
        "input_ids": [11, 12, 13, 14, 15],
        "sampling_params": {"max_new_tokens": 8, "temperature": 0.0},
        "return_logprob": True,
    },
    {
        "text": "Once upon a time",
        "sampling_params": {"max_new_tokens": 8, "temperature": 1.0, "sampling_seed": 3},
        "return_logprob": True,
    },
    {"text": ["x", "y"], "sampling_params": {"max_new_tokens": 5, "top_k": 20, "sampling_seed": 9}},
    {
        "input_ids": [2, 3],
        "sampling_params": {"max_new_tokens": 4, "temperature": 0.7, "sampling_seed": 1, "n": 2},
    },
]


def _strip(result: Any) -> Any:
    """Drop what legitimately differs between two engines: ids and timings."""
    if isinstance(result, list):
        return [_strip(r) for r in result]
    meta = {k: v for k, v in result["meta_info"].items() if k not in ("id", "e2e_latency")}
    return {**result, "meta_info": meta}


def _split_logprobs(result: Any, out: list[float]) -> Any:
    """``result`` with every log-prob value (``[logprob, token_id, text]`` entries of the
    ``*_logprobs`` fields) replaced by ``None``; the values appended to ``out`` in order."""
    if isinstance(result, list):
        return [_split_logprobs(r, out) for r in result]
    if not isinstance(result, dict) or "meta_info" not in result:
        return result

    def entries(value: Any) -> Any:
        if isinstance(value, list) and len(value) == 3 and isinstance(value[0], float):
            out.append(value[0])
            return [None, *value[1:]]
        return [entries(v) for v in value] if isinstance(value, list) else value

    meta = {k: entries(v) if k.endswith("_logprobs") else v for k, v in result["meta_info"].items()}
    return {**result, "meta_info": meta}


def _logprob_tol(engine: Any, results: list[Any]) -> float:
    """``logprob_tol`` of the engine's model over the scenario's longest sequence and lowest
    temperature."""
    temperature = min(p["sampling_params"].get("temperature", 1.0) or 1.0 for p in SCENARIO)
    metas = [r["meta_info"] for r in results if isinstance(r, dict) and "meta_info" in r]
    metas += [x["meta_info"] for r in results if isinstance(r, list) for x in r]
    longest = max(m["prompt_tokens"] + m["completion_tokens"] for m in metas)
    return logprob_tol(engine.engine.model, longest, temperature)


async def _run(client: EngineClient) -> list[Any]:
    assert await client.health()
    assert await client.flush_cache()  # same (empty) prefix cache on both sides
    out = [_strip(await client.generate(p)) for p in SCENARIO]
    streamed = [c async for c in client.generate_stream(SCENARIO[0])]
    assert streamed[-1]["output_ids"] == out[0]["output_ids"] and streamed[-1]["meta_info"]["finish_reason"]
    out.append(await client.get_weight_version())
    with pytest.raises(EngineRequestError, match="temperature") as err:
        await client.generate({"input_ids": [1], "sampling_params": {"temperature": -1}})
    assert err.value.status == 400
    await client.abort()
    return out


def test_http_and_local_clients_agree(server_url, local_engine):
    async def main() -> tuple[list[Any], list[Any]]:
        http = HttpEngineClient(server_url)
        local = LocalEngineClient(local_engine)  # type: ignore[arg-type]
        try:
            return await _run(http), await _run(local)
        finally:
            await http.close()
            await local.close()

    remote, local = asyncio.run(main())
    # Two engines, each in its own process with its own thread count (the served one runs with
    # OMP_NUM_THREADS=1): a BLAS may split a product's sums between threads, so their log-probs
    # agree to rounding, not bit for bit (nor would they in batch-invariant mode, which fixes a
    # product's shape, not the BLAS's threading). Everything else, the tokens included, is equal.
    remote_lp: list[float] = []
    local_lp: list[float] = []
    assert _split_logprobs(remote, remote_lp) == _split_logprobs(local, local_lp)
    assert len(remote_lp) == len(local_lp) > 0
    tol = _logprob_tol(local_engine, local)
    assert max(abs(a - b) for a, b in zip(remote_lp, local_lp)) <= tol, (remote_lp, local_lp, tol)
    assert remote[1]["meta_info"]["finish_reason"] is not None and len(remote[2]) == 2 and len(remote[3]) == 2


def test_retries_until_the_server_comes_up(local_engine, tiny_model_dir):
    from miles.engine.server import ServerConfig, create_app

    port = free_port()
    server = ThreadServer(create_app(local_engine, ServerConfig(tiny_model_dir)), port)  # type: ignore[arg-type]
    timer = threading.Timer(0.6, server.start, kwargs={"wait": False})
    timer.start()

    async def main() -> Any:
        client = HttpEngineClient(
            f"http://127.0.0.1:{port}", max_retries=10, backoff_s=0.1, max_backoff_s=0.5
        )
        try:
            return await client.generate({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
        finally:
            await client.close()

    try:
        started = time.monotonic()
        result = asyncio.run(main())
        assert result["meta_info"]["completion_tokens"] == 2 and time.monotonic() - started >= 0.5
    finally:
        timer.join()
        server.stop()


def test_gives_up_after_the_retry_budget():
    async def main() -> None:
        client = HttpEngineClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff_s=0.01)
        try:
            await client.generate({"input_ids": [1]})
        finally:
            await client.close()

    with pytest.raises(EngineConnectionError, match="no answer after 3 attempts") as err:
        asyncio.run(main())
    assert err.value.status is None


def test_5xx_is_retried_and_4xx_is_not():
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if request.url.path == "/bad":
            return httpx.Response(400, json={"error": {"message": "input_ids: the prompt is empty"}})
        if calls["n"] < 3:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, json={"weight_version": "7"})

    async def main() -> tuple[str, EngineRequestError]:
        client = HttpEngineClient("http://engine", backoff_s=0.01, transport=httpx.MockTransport(handler))
        try:
            version = await client.get_weight_version()
            with pytest.raises(EngineRequestError) as err:
                await client.request("POST", "/bad", {})
            return version, err.value
        finally:
            await client.close()

    version, error = asyncio.run(main())
    assert version == "7" and error.status == 400 and error.message == "input_ids: the prompt is empty"
    assert calls["n"] == 4  # two 503s, the success, then the 400 once

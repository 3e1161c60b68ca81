"""Miles as the client of a broken or hostile server: every call it makes has a timeout and
reads a bounded answer (a real TCP server on loopback that never answers, trickles, or sends
without end)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest

from miles.engine.client import EngineRequestError, HttpEngineClient, http_call
from miles.orchestrate.health import HealthMonitor
from miles.orchestrate.weight_transport import WeightSyncError, _post

CHUNK = b"x" * 65536


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``/health`` and ``/silent``: silence; ``/trickle``: a byte at a time; ``/generate``: one
    endless line; anything else: an endless body."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1]
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
        await reader.readexactly(length)
        if path in (b"/health", b"/silent"):
            await asyncio.sleep(3600)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        while True:
            data = b"{" if path == b"/trickle" else (b"data: " + CHUNK if path == b"/generate" else CHUNK)
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(0.2 if path == b"/trickle" else 0)
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def hostile_url() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(_handle, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"

    async def shutdown() -> None:  # end the handlers still sending or sleeping
        server.close()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in handlers:
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(shutdown(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_http_call_bounds_the_answer_and_the_wait(hostile_url: str) -> None:
    with pytest.raises(EngineRequestError, match="larger than 1048576 bytes"):
        http_call("GET", f"{hostile_url}/endless", timeout_s=30, max_response_bytes=1 << 20)
    with pytest.raises(httpx.ReadTimeout):
        http_call("GET", f"{hostile_url}/health", timeout_s=1)  # never answers
    with pytest.raises(httpx.ReadTimeout):
        http_call("GET", f"{hostile_url}/trickle", timeout_s=1)  # a byte every 0.2 s, forever


def test_async_client_bounds_answers_streams_and_health(hostile_url: str) -> None:
    async def main() -> tuple[str, str, bool]:
        client = HttpEngineClient(hostile_url, max_response_bytes=1 << 20, health_timeout_s=1, max_retries=0)
        try:
            with pytest.raises(EngineRequestError) as whole:
                await client.request("GET", "/endless")
            with pytest.raises(EngineRequestError) as line:
                async for _ in client.generate_stream({"input_ids": [1]}):
                    pass
            return str(whole.value), str(line.value), await client.health()
        finally:
            await client.close()

    whole, line, healthy = asyncio.run(main())
    assert "larger than 1048576 bytes" in whole and "streamed line longer than" in line and healthy is False


def test_orchestration_calls_give_up(hostile_url: str) -> None:
    monitor = HealthMonitor(lambda: [hostile_url], lambda i: None, timeout_s=1)
    assert monitor.healthy(0, hostile_url) is False
    with pytest.raises(WeightSyncError, match="larger than"):
        _post(hostile_url, "/update_weights_from_disk", {"model_path": "x"})
    with pytest.raises(WeightSyncError, match="ReadTimeout"):
        _post(hostile_url, "/trickle", {}, timeout_s=1)


def test_the_rollout_client_waits_as_long_as_the_router_timeout_says(hostile_url: str) -> None:
    """``--sglang-router-request-timeout-secs`` bounds the wait for each answer of the rollout's
    client of the engines (it was accepted and read by nothing)."""
    from miles.config import parse_train_args
    from miles.orchestrate.ray import rollout_client

    config = parse_train_args(["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rollout-batch-size", "1",
                               "--n-samples-per-prompt", "2", "--num-rollout", "1",
                               "--sglang-router-request-timeout-secs", "1"])  # fmt: skip

    async def main() -> None:
        client = rollout_client(config, hostile_url)
        try:
            await client.request("POST", "/silent", {"input_ids": [1]})
        finally:
            await client.close()

    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(main())

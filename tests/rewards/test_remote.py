"""remote_rm against a real local HTTP server (http.server in a thread)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from miles.rewards.remote import RemoteRewardError, RemoteRewardModel, remote_rm
from miles.types import Sample


class _Server:
    """Replies from a script of (status, body) pairs; the last one repeats."""

    def __init__(self) -> None:
        self.script: list[tuple[int, str]] = [(200, "1.0")]
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(json.loads(body))
                status, text = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/reward"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _sample() -> Sample:
    return Sample(prompt="1+1?", response="2", label="2", metadata={"k": 1})


def test_remote_rm_posts_sample_and_reads_number(server):
    server.script = [(200, "0.75")]
    reward = asyncio.run(remote_rm(SimpleNamespace(rm_url=server.url), _sample()))
    assert reward == 0.75
    assert server.requests == [{"prompt": "1+1?", "response": "2", "label": "2", "metadata": {"k": 1}}]


def test_reward_object_reply(server):
    server.script = [(200, '{"reward": -1}')]
    assert asyncio.run(remote_rm(SimpleNamespace(rm_url=server.url), _sample())) == -1.0


def test_retries_after_503(server):
    server.script = [(503, "busy"), (503, "busy"), (200, "1")]
    model = RemoteRewardModel(server.url, backoff_s=0.01)
    assert asyncio.run(model.score("p", "r", "l", {})) == 1.0
    assert len(server.requests) == 3


def test_gives_up_after_max_retries(server):
    server.script = [(500, "boom")]
    model = RemoteRewardModel(server.url, max_retries=2, backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match=r"failed 3 attempts; last error: HTTP 500: boom"):
        asyncio.run(model.score("p", "r", "l", {}))
    assert len(server.requests) == 3


def test_400_fails_at_once(server):
    server.script = [(400, "missing field label")]
    model = RemoteRewardModel(server.url, backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match=r"rejected the request: HTTP 400: missing field label"):
        asyncio.run(model.score("p", "r", "l", {}))
    assert len(server.requests) == 1


@pytest.mark.parametrize("body", ['{"score": 1}', '"high"', "not json", "[1]", "true"])
def test_malformed_reply(server, body):
    server.script = [(200, body)]
    with pytest.raises(RemoteRewardError, match="expected a number"):
        asyncio.run(RemoteRewardModel(server.url).score("p", "r", "l", {}))


def test_connection_refused_is_retried_then_reported():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = RemoteRewardModel(f"http://127.0.0.1:{port}/", max_retries=1, backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match="failed 2 attempts; last error: ConnectError"):
        asyncio.run(model.score("p", "r", "l", {}))


def test_missing_url():
    with pytest.raises(RemoteRewardError, match="--rm-url"):
        asyncio.run(remote_rm(SimpleNamespace(rm_url=None), _sample()))

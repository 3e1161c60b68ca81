"""remote_rm against a real local HTTP server (http.server in a thread)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from miles.config import RolloutConfig
from miles.rewards.remote import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    MAX_REPLY_BYTES,
    RemoteRewardError,
    RemoteRewardModel,
    remote_rm,
)
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
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = RemoteRewardModel(f"http://127.0.0.1:{port}/", max_retries=1, backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match="failed 2 attempts; last error: ConnectError"):
        asyncio.run(model.score("p", "r", "l", {}))


def test_missing_url():
    with pytest.raises(RemoteRewardError, match="--rm-url"):
        asyncio.run(remote_rm(SimpleNamespace(rm_url=None), _sample()))


class _RawServer:
    """A TCP server that reads each request and answers with ``reply`` (bytes, or a callable
    writing to the socket); ``reply=None`` never answers. Connections are counted."""

    def __init__(self, reply=None) -> None:
        self.reply = reply
        self.connections = 0
        self.release = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/reward"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(body) < length:  # read it all: closing on unread data would reset the reply
                body += conn.recv(65536)
            if self.reply is None:
                self.release.wait()
                return
            with contextlib.suppress(OSError):  # the client hangs up, as it should on an oversized reply
                self.reply(conn) if callable(self.reply) else conn.sendall(self.reply)

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[..., _RawServer]]:
    servers: list[_RawServer] = []

    def make(reply=None) -> _RawServer:
        servers.append(_RawServer(reply))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _run(coro, limit_s: float = 10.0):
    """Run ``coro``, failing the test (instead of hanging it) if it takes past ``limit_s``."""
    return asyncio.run(asyncio.wait_for(coro, limit_s))


def test_silent_server_times_out_after_rm_timeout_and_rm_max_retries(raw_server):
    """Regression: a server that accepted and never replied held each sample 120 s x 7 tries."""
    server = raw_server(None)
    args = SimpleNamespace(rm_url=server.url, rm_timeout=0.2, rm_max_retries=1)
    with pytest.raises(RemoteRewardError, match=r"failed 2 attempts; last error: .*(Timeout|0.2 s)"):
        _run(remote_rm(args, _sample()))
    assert server.connections == 2


def test_trickling_server_is_bounded_by_rm_timeout_as_a_whole(raw_server):
    """httpx's read timeout restarts with every byte: the whole request must be bounded."""

    def trickle(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(100000):
            conn.sendall(b" ")
            time.sleep(0.05)

    server = raw_server(trickle)
    args = SimpleNamespace(rm_url=server.url, rm_timeout=0.3, rm_max_retries=0)
    with pytest.raises(
        RemoteRewardError, match=r"failed 1 attempts; last error: no complete reply within 0.3 s"
    ):
        _run(remote_rm(args, _sample()))


def test_defaults_match_the_flags():
    defaults = {f.name: f.default for f in dataclasses.fields(RolloutConfig)}
    assert RemoteRewardModel("http://x").timeout_s == defaults["rm_timeout"] == DEFAULT_TIMEOUT_S
    assert RemoteRewardModel("http://x").max_retries == defaults["rm_max_retries"] == DEFAULT_MAX_RETRIES


_HUGE = MAX_REPLY_BYTES + 1024


def _huge_unsized(conn: socket.socket) -> None:  # no Content-Length: the body runs until close
    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n1")
    conn.sendall(b" " * _HUGE)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n1" % (_HUGE + 1) + b" " * _HUGE, "declares"),
        (_huge_unsized, f"sent more than {MAX_REPLY_BYTES} bytes"),
    ],
    ids=["declared", "streamed"],
)
def test_oversized_reply_is_refused(raw_server, reply, message):
    """A valid number padded with megabytes of spaces used to be read whole and accepted."""
    server = raw_server(reply)
    with pytest.raises(RemoteRewardError, match=f"reply {message}.*limit is {MAX_REPLY_BYTES} bytes"):
        _run(RemoteRewardModel(server.url, max_retries=0).score("p", "r", "l", {}))


def test_endless_error_body_is_quoted_not_read(raw_server):
    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\n")
        while True:  # until the client hangs up
            conn.sendall(b"x" * 65536)

    server = raw_server(endless)
    with pytest.raises(RemoteRewardError, match=r"last error: HTTP 500: x{200}$"):
        _run(RemoteRewardModel(server.url, max_retries=0).score("p", "r", "l", {}))


def test_compressed_reply_is_refused(raw_server):
    body = gzip.compress(b"1" + b" " * 100_000)
    server = raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    with pytest.raises(RemoteRewardError, match="Content-Encoding 'gzip'"):
        _run(RemoteRewardModel(server.url, max_retries=0).score("p", "r", "l", {}))


def test_deeply_nested_reply_is_a_clear_error(raw_server):
    body = b"[" * 100_000 + b"]" * 100_000
    server = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    with pytest.raises(RemoteRewardError, match="replied with non-JSON"):
        _run(RemoteRewardModel(server.url, max_retries=0).score("p", "r", "l", {}))

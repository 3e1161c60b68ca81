"""One ``miles serve`` process: started, health-checked, killed and restarted on the same port.

Under Ray each engine actor owns one of these (the server is a child process of the actor, so a
crash of the server is observable, and recoverable, from the actor that survives it); tests use it
directly to stand up independently deployed engines.

``admin_key`` reaches the server through its environment (``$MILES_ADMIN_API_KEY``), never its
command line, which any user of the machine can read with ``ps``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from miles.config import SPECS, EngineConfig, MilesConfig
from miles.engine.client import ADMIN_KEY_ENV, EngineRequestError, http_call


class EngineProcessError(RuntimeError):
    """The server did not come up (its exit code and the end of its log are in the message)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_arguments(config: MilesConfig, dtype: str, max_total_tokens: int) -> list[str]:
    """``miles serve`` flags that make a server equal to the embedded engine of ``config``: the
    model, ``dtype``, and ``config.engine`` with its KV capacity resolved (``max_total_tokens``,
    computed from the memory by the caller) written back as the ``--sglang-*`` flags it was
    parsed from (:func:`engine_flags`)."""
    assert config.model.hf_checkpoint is not None
    engine = dataclasses.replace(config.engine, max_total_tokens=max_total_tokens)
    return ["--hf-checkpoint", config.model.hf_checkpoint, "--dtype", dtype, *engine_flags(engine)]


def engine_flags(engine: EngineConfig) -> list[str]:
    """The ``--sglang-*`` flags that give ``engine`` back when ``miles serve`` parses them: every
    setting of an engine away from its default. The rollout client's settings
    (``EngineConfig.client_fields``) are the trainer's, not the server's, and verbatim SGLang
    options reach no built-in engine: neither is written."""
    client = EngineConfig.client_fields()
    flags: list[str] = []
    for spec in SPECS.values():
        if spec.section != "engine" or not spec.cli or spec.name in client:
            continue
        value = getattr(engine, spec.name)
        if value == spec.default:
            continue
        if spec.kind == "bool":
            flags.append(spec.flag if value else "--no-" + spec.flag[2:])
        elif value is None or spec.kind not in ("int", "float", "str"):
            raise ValueError(f"{spec.flag}: {value!r} cannot be written as a flag")
        else:
            flags += [spec.flag, repr(value) if spec.kind == "float" else str(value)]
    return flags


class EngineProcess:
    """``python -m miles serve ARGS --host HOST --port PORT`` as a child process.

    ``port`` is fixed at construction, so a restarted server answers at the same URL (the
    router and the rollout client keep theirs). The log goes to ``log_path`` (appended across
    restarts) so a failed start can be diagnosed. ``admin_key`` (``None``: the one in ``env``, if
    any) guards the server's admin endpoints; a server on a non-loopback ``host`` needs one for
    a trainer on another host to reach them.
    """

    def __init__(
        self,
        serve_args: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        admin_key: str | None = None,
    ) -> None:
        self.serve_args = list(serve_args)
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if admin_key is not None:
            if not admin_key:
                raise ValueError("admin_key must not be empty")
            self.env[ADMIN_KEY_ENV] = admin_key
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EngineProcess:
        if self.alive():
            raise EngineProcessError(f"the server at {self.url} is already running")
        cmd = [sys.executable, "-m", "miles", "serve", *self.serve_args]
        cmd += ["--host", self.host, "--port", str(self.port)]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        return self

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        """Block until ``/health`` answers 200; raise if the process exits or time runs out."""

        def exited() -> str | None:
            if self.proc is not None and self.proc.poll() is None:
                return None
            code = None if self.proc is None else self.proc.returncode
            return f"engine at {self.url} exited with {code}{self._log_tail()}"

        wait_healthy_url(self.url, timeout_s, exited=exited, poll_s=0.2, detail=self._log_tail)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def kill(self) -> None:
        """SIGKILL, no clean-up: what a crash looks like (fault-tolerance tests)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout_s: float = 300.0) -> None:
        """Stop (if still running), start on the same port, wait until healthy."""
        self.stop()
        self.restarts += 1
        deadline = time.monotonic() + 30
        while not _port_free(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.2)  # the dead server's socket may linger a moment
        self.start().wait_healthy(timeout_s)

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return f"; log {self.log_path}:\n{self.log_path.read_text(errors='replace')[-3000:]}"


def wait_healthy_url(
    url: str,
    timeout_s: float,
    *,
    exited: Callable[[], str | None] | None = None,
    poll_s: float = 0.5,
    detail: Callable[[], str] = str,
) -> None:
    """Block until ``url``'s ``/health`` answers 200; ``exited`` (if given) returns a message when
    the server's process is gone, which ends the wait at once; ``detail()`` ends the timeout message."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        gone = exited() if exited is not None else None
        if gone is not None:
            raise EngineProcessError(gone)
        try:
            if http_call("GET", f"{url}/health", timeout_s=2.0, max_response_bytes=1 << 16).status == 200:
                return
        except (httpx.HTTPError, EngineRequestError):
            pass
        time.sleep(poll_s)
    raise EngineProcessError(f"engine at {url} not healthy after {timeout_s:.0f} s{detail()}")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


__all__ = [
    "EngineProcess",
    "EngineProcessError",
    "engine_flags",
    "free_port",
    "serve_arguments",
    "wait_healthy_url",
]

"""The real sglang-router in front of several engines, started and stopped by Miles.

Workers are registered with ``POST /workers {"url": ...}`` (the router checks their health in
the background before it routes to them) and removed with ``DELETE /workers/{id}``; Miles waits
until the router lists a worker as healthy, so a registered engine takes work at once. The router
retries a request on another worker when one fails (``--retry-max-retries``), and the rollout
client retries on top of that, so a request that an engine crash cut short is generated again
elsewhere (once: the cut one never returned).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from miles.engine.client import EngineRequestError, HttpAnswer, http_call
from miles.orchestrate.engine_process import free_port

_MAX_ANSWER_BYTES = 16 * 1024**2  # the router's worker list: small JSON


class RouterError(RuntimeError):
    """The router did not start, or refused a worker."""


class SglangRouter:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> SglangRouter:
        try:
            import sglang_router  # noqa: F401
        except ImportError:
            raise RouterError(
                "several engines are reached through sglang-router: pip install sglang-router"
            ) from None
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", self.host]
        cmd += ["--port", str(self.port), "--policy", "round_robin", "--log-level", "warn"]
        # Fast health checks: a dead engine leaves the rotation within about a second, and the
        # router retries a failed request on another worker before the client sees an error.
        cmd += ["--health-check-interval-secs", "1", "--health-failure-threshold", "1"]
        cmd += ["--retry-max-retries", "3", "--worker-startup-timeout-secs", "300"]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RouterError(f"sglang-router exited with {self.proc.returncode}{self._log_tail()}")
            try:
                if self._call("GET", "/workers", timeout_s=1.0).status < 400:
                    return self
            except (httpx.HTTPError, RouterError):
                pass
            time.sleep(0.2)
        raise RouterError(f"sglang-router not up at {self.url} after {timeout_s:.0f} s{self._log_tail()}")

    def _call(
        self, method: str, path: str, payload: dict[str, Any] | None = None, timeout_s: float = 10.0
    ) -> HttpAnswer:
        try:
            return http_call(method, f"{self.url}{path}", payload, timeout_s=timeout_s,
                             max_response_bytes=_MAX_ANSWER_BYTES)  # fmt: skip
        except EngineRequestError as e:  # an answer past the bound
            raise RouterError(f"sglang-router {path}: {e}") from None

    def workers(self) -> list[dict[str, Any]]:
        r = self._call("GET", "/workers")
        if r.status >= 400:
            raise RouterError(f"sglang-router /workers: HTTP {r.status}: {r.text(300)}")
        try:
            workers = r.json().get("workers", [])
        except (ValueError, AttributeError):
            raise RouterError(f"sglang-router /workers: not a JSON object: {r.text(300)}") from None
        return list(workers)

    def worker_urls(self) -> list[str]:
        return [str(w["url"]) for w in self.workers()]

    def add(self, url: str, timeout_s: float = 60.0) -> None:
        """Register ``url`` and wait until the router lists it healthy."""
        r = self._call("POST", "/workers", {"url": url})
        if r.status >= 400:
            raise RouterError(f"router refused worker {url}: {r.status} {r.text(300)}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for w in self.workers():
                if w.get("url") == url and w.get("is_healthy", True):
                    return
            time.sleep(0.1)
        raise RouterError(f"router did not accept worker {url} within {timeout_s:.0f} s{self._log_tail()}")

    def remove(self, url: str) -> None:
        """Take ``url`` out of the rotation (a worker it does not list is ignored)."""
        for w in self.workers():
            if w.get("url") == url:
                wid = w.get("id") or w.get("worker_id")
                r = self._call("DELETE", f"/workers/{wid}")
                if r.status >= 400 and r.status != 404:
                    raise RouterError(f"router refused to remove {url}: {r.status} {r.text(300)}")
        deadline = time.monotonic() + 30
        while url in self.worker_urls() and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return f"; log:\n{self.log_path.read_text(errors='replace')[-2000:]}"


__all__ = ["RouterError", "SglangRouter"]

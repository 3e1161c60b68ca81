"""Rollout fault tolerance: a thread that health-checks the engines and recovers dead ones.

Every ``interval_s`` (after ``first_wait_s``) each engine in service gets ``GET /health`` with a
``timeout_s`` budget (and its process is asked whether it still runs, which catches a crash at
once). An engine that fails is recovered by ``recover(index)``, on this thread, while the others
keep serving: the placement takes it out of the router, restarts its server, re-syncs its
weights and only then puts it back (so it never serves stale weights). Requests it had in flight
fail at the router or the client, which retry them on the live engines.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import httpx

from miles.engine.client import EngineRequestError, http_call

logger = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(
        self,
        urls: Callable[[], Sequence[str]],
        recover: Callable[[int], None],
        *,
        process_alive: Callable[[int], bool] | None = None,
        interval_s: float = 30.0,
        timeout_s: float = 30.0,
        first_wait_s: float = 0.0,
    ) -> None:
        self.urls = urls
        self.recover = recover
        self.process_alive = process_alive
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.first_wait_s = first_wait_s
        self.recoveries = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="miles-engine-health", daemon=True)

    def start(self) -> HealthMonitor:
        self._thread.start()
        return self

    def healthy(self, index: int, url: str) -> bool:
        if self.process_alive is not None and not self.process_alive(index):
            return False
        try:
            answer = http_call("GET", f"{url}/health", timeout_s=self.timeout_s, max_response_bytes=1 << 16)
        except (httpx.HTTPError, EngineRequestError):
            return False
        return answer.status == 200

    def check_once(self) -> list[int]:
        """One round: recover every engine that fails its check; returns their indices."""
        failed = [
            i for i, url in enumerate(self.urls()) if not self._stop.is_set() and not self.healthy(i, url)
        ]
        for i in failed:
            if self._stop.is_set():
                break
            logger.warning("engine %d failed its health check: restarting it", i)
            try:
                self.recover(i)
                self.recoveries += 1
            except Exception as e:  # keep watching the others; the next round tries again
                logger.exception("recovering engine %d failed", i)
                self.errors.append(f"engine {i}: {type(e).__name__}: {e}")
        return failed

    def _run(self) -> None:
        if self._stop.wait(self.first_wait_s):
            return
        while not self._stop.is_set():
            self.check_once()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(self.timeout_s, 5.0) + 60)


__all__ = ["HealthMonitor"]

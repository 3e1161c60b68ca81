"""The real sglang-router in front of two ``miles serve`` workers: it accepts them (health
checks pass) and proxies ``/generate`` to them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.engine.conftest import free_port


def test_sglang_router_balances_miles_workers(workers):
    pytest.importorskip("sglang_router")
    port = free_port()
    urls = [w.url for w in workers]
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--worker-urls", *urls, "--policy", "round_robin", "--log-level", "warn"]
    cmd += ["--health-check-interval-secs", "1", "--worker-startup-timeout-secs", "30"]
    router = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        answer = None
        while time.monotonic() < deadline and router.poll() is None:
            try:
                r = httpx.post(
                    f"{base}/generate",
                    json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 3}},
                    timeout=10,
                )
                if r.status_code == 200:
                    answer = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        if answer is None:
            router.kill()
            out = router.stdout.read().decode() if router.stdout else ""
            pytest.fail(f"router never served /generate:\n{out[-3000:]}")
        assert answer["meta_info"]["completion_tokens"] == 3 and len(answer["output_ids"]) == 3
        # round robin: several requests reach both workers
        before = [_generated(u) for u in urls]
        for _ in range(4):
            r = httpx.post(
                f"{base}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}, timeout=10
            )
            assert r.status_code == 200, r.text
        assert all(_generated(u) > b for u, b in zip(urls, before))
        # a bad request comes back as the worker's 400
        r = httpx.post(f"{base}/generate", json={"input_ids": [], "sampling_params": {}}, timeout=10)
        assert r.status_code == 400
    finally:
        if router.poll() is None:
            router.terminate()
            try:
                router.wait(10)
            except subprocess.TimeoutExpired:
                router.kill()


def _generated(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("sglang:generation_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no generation_tokens_total in /metrics")

"""A ``miles serve`` child process as the Ray engine actors own it: start, crash, restart, admin key."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest

from miles.orchestrate.engine_process import EngineProcess, EngineProcessError, wait_healthy_url


def test_kill_and_restart_on_the_same_port(arith_world, tmp_path):
    proc = EngineProcess(["--hf-checkpoint", str(arith_world / "model"), "--sglang-max-total-tokens", "512"],
                         log_path=tmp_path / "engine.log").start()  # fmt: skip
    try:
        proc.wait_healthy(120)
        url, pid = proc.url, proc.pid()
        proc.kill()
        assert not proc.alive()
        with pytest.raises(EngineProcessError, match="not healthy"):
            wait_healthy_url(url, 0.5)
        proc.restart(120)
        assert proc.url == url and proc.pid() != pid and proc.restarts == 1
        r = httpx.post(
            f"{url}/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}
        )
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 2
    finally:
        proc.stop()


def test_a_server_that_cannot_start_says_why(tmp_path):
    proc = EngineProcess(
        ["--hf-checkpoint", str(tmp_path / "missing")], log_path=tmp_path / "engine.log"
    ).start()
    with pytest.raises(EngineProcessError, match=r"(?s)exited with 2.*checkpoint not found"):
        proc.wait_healthy(60)


def test_the_admin_key_travels_in_the_environment_not_the_command_line(arith_world, tmp_path):
    """What Ray-started engines get: their admin endpoints need the key, and ``ps`` (the
    process's command line) does not show it."""
    key = f"admin-{secrets.token_hex(16)}"
    proc = EngineProcess(["--hf-checkpoint", str(arith_world / "model"), "--sglang-max-total-tokens", "512"],
                         log_path=tmp_path / "engine.log", admin_key=key).start()  # fmt: skip
    try:
        proc.wait_healthy(120)
        assert key.encode() not in Path(f"/proc/{proc.pid()}/cmdline").read_bytes()
        denied = httpx.post(f"{proc.url}/continue_generation", json={}, timeout=30)
        assert denied.status_code == 401 and "admin key" in denied.json()["error"]["message"]
        allowed = httpx.post(
            f"{proc.url}/continue_generation", json={}, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        assert allowed.json()["success"] is True
        r = httpx.post(
            f"{proc.url}/generate",
            json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}},
            timeout=30,
        )
        assert r.status_code == 200  # generation needs no key
    finally:
        proc.stop()

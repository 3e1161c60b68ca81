"""A ``miles serve`` child process as the Ray engine actors own it: start, crash, restart."""

from __future__ import annotations

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

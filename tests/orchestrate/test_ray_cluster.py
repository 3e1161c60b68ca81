"""docs/cluster.md's recipe on one machine: ``ray start --head``, a second node with
``ray start --address=...``, and ``ray job submit -- miles train ...`` (the trainer's two ranks and
the engine spread over the two nodes by Ray)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miles.orchestrate.engine_process import free_port
from miles.utils.metrics import read_metrics
from tests.orchestrate.helpers import train_argv

pytest.importorskip("ray")
pytest.importorskip("sglang_router")


def _ray_bin() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if found is None:
        pytest.skip("the ray command is not installed")
    return found


def test_ray_start_and_job_submit_run_miles_train(arith_world, tmp_path):
    ray = _ray_bin()
    # Token authentication (the default of recent Ray) for every command, as the docs say; the
    # token is this test's own (RAY_AUTH_TOKEN), not whatever ~/.ray/auth_token a machine has.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    gcs, dashboard = free_port(), free_port()
    common = ["--block", "--disable-usage-stats", "--num-cpus", "3"]
    head = subprocess.Popen(
        [ray, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--node-ip-address", "127.0.0.1", *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    nodes = [head]
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            status = subprocess.run([ray, "status", "--address", f"127.0.0.1:{gcs}"], capture_output=True,
                                    text=True, env=env)  # fmt: skip
            if status.returncode == 0:
                break
            time.sleep(1)
        assert status is not None and status.returncode == 0, status.stderr if status else "no status"
        worker = subprocess.Popen(
            [ray, "start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1", *common],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        nodes.append(worker)
        while time.monotonic() < deadline:
            out = subprocess.run([ray, "status", "--address", f"127.0.0.1:{gcs}"], capture_output=True,
                                 text=True, env=env).stdout  # fmt: skip
            if out.count("node_") >= 2:
                break
            time.sleep(1)
        else:
            pytest.fail("the second node never joined")
        run_dir = tmp_path / "run"
        train = train_argv(arith_world, run_dir, "--num-rollout", "2", "--actor-num-gpus-per-node", "2",
                      "--rollout-num-gpus", "1")  # fmt: skip
        job = subprocess.run(
            [ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
             sys.executable, "-m", "miles", *train],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == [0, 1]
        assert all(r["perf/update_weights_time"] > 0 and r["rollout/failed_samples"] == 0 for r in rows)
    finally:
        for node in reversed(nodes):  # --block: terminating the launcher stops that node
            node.terminate()
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        # `ray stop` would also remove the pointer to this (now dead) cluster; later ray.init()
        # calls without an address would try to join it.
        pointer = Path("/tmp/ray/ray_current_cluster")
        if pointer.is_file() and pointer.read_text().strip().endswith(f":{gcs}"):
            pointer.unlink()

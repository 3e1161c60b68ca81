"""A real ``miles serve`` process with both keys and small limits, for the hostile-payload corpus.

The tiny model fixture is the HTTP tests' (imported, so this folder runs on its own too)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.engine.conftest import ServerProcess, free_port, tiny_model_dir  # noqa: F401 (a fixture)

API_KEY = "corpus-api-key"
ADMIN_KEY = "corpus-admin-key"
MAX_REQUEST_BYTES = 1 << 20
MAX_REQUESTS_PER_CALL = 64


@pytest.fixture(scope="module")
def hardened_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:  # noqa: F811
    """``miles serve`` with an API key, an admin key (through the environment, as Miles passes
    it) and a 1 MiB body limit. Its log goes to a file (a pipe nobody reads could fill up)."""
    port = free_port()
    cmd = [sys.executable, "-m", "miles", "serve", "--hf-checkpoint", tiny_model_dir, "--port", str(port),
           "--sglang-max-total-tokens", "2048", "--sglang-page-size", "8", "--log-level", "error",
           "--api-key", API_KEY, "--max-request-bytes", str(MAX_REQUEST_BYTES),
           "--max-requests-per-call", str(MAX_REQUESTS_PER_CALL)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MILES_ADMIN_API_KEY=ADMIN_KEY)
    log = tmp_path_factory.mktemp("hardened") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc)
    try:
        yield server.wait()
    finally:
        server.stop()

"""Fixtures for the HTTP tests: a tiny Llama saved with the real SmolLM2 tokenizer, and real
``miles serve`` subprocesses on free ports (started in parallel, shared by the session)."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest


def make_engine(model: Any, tokenizer: Any = None, **kw: Any) -> Any:
    """An ``Engine`` from keyword arguments: ``EngineConfig`` fields (SGLang's names: ``page_size``,
    ``random_seed``, ...) make its config, the rest (``num_blocks``, ``eos_token_ids``, ...) go to
    the engine as they are."""
    from miles.config import EngineConfig
    from miles.engine.engine import Engine

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    config = EngineConfig(**{k: v for k, v in kw.items() if k in names})
    return Engine(model, tokenizer, config, **{k: v for k, v in kw.items() if k not in names})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{out[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not up after {timeout_s} s")


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]

    def wait(self, timeout_s: float = 90.0) -> ServerProcess:
        wait_http(f"{self.url}/health", timeout_s, self.proc)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(model_dir: str, *extra: str) -> ServerProcess:
    """``miles serve`` on a free port (not waited for: call ``.wait()``)."""
    port = free_port()
    cmd = [sys.executable, "-m", "miles", "serve", "--hf-checkpoint", model_dir, "--port", str(port)]
    cmd += ["--sglang-max-total-tokens", "4096", "--sglang-page-size", "8", "--log-level", "warning", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(f"http://127.0.0.1:{port}", proc)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random Llama with SmolLM2's vocabulary, tokenizer and chat template."""
    import torch
    import transformers

    from miles.models.loading import load_tokenizer

    path = tmp_path_factory.mktemp("tiny_serve")
    tokenizer = load_tokenizer(smollm2)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)  # peaked distributions: greedy ties are unlikely
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(Path(path))


@pytest.fixture(scope="session")
def workers(tiny_model_dir: str) -> Iterator[list[ServerProcess]]:
    """Two ``miles serve`` workers (the first is the one most tests use), started together."""
    procs = [start_server(tiny_model_dir, "--sglang-random-seed", "0") for _ in range(2)]
    try:
        for p in procs:
            p.wait()
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="session")
def server_url(workers: list[ServerProcess]) -> str:
    return workers[0].url


class ThreadServer:
    """uvicorn serving an app in a thread of this process (for in-process engines)."""

    def __init__(self, app: object, port: int | None = None) -> None:
        import threading

        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, wait: bool = True) -> ThreadServer:
        self.thread.start()
        if wait:
            wait_http(f"{self.url}/health", 30)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def local_engine(tiny_model_dir: str) -> Iterator[object]:
    """An in-process ``AsyncEngine`` over the tiny model, sized like the served ones."""
    from miles.config import EngineConfig
    from miles.engine.async_engine import AsyncEngine
    from miles.engine.server import ServerConfig, build_engine

    engine_config = EngineConfig(max_total_tokens=4096, page_size=8, random_seed=0)
    config = ServerConfig(model_path=tiny_model_dir, engine=engine_config)
    engine = AsyncEngine(build_engine(config)).start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two checkpoints of the same tiny tied Llama (seeds 0 and 1): A is served, B is pushed."""
    from tests.models.conftest import CASES, make_hf_model

    prefix, kwargs = CASES["llama"]
    out = {}
    for tag, seed in (("a", 0), ("b", 1)):
        path = tmp_path_factory.mktemp(f"ckpt_{tag}")
        make_hf_model(prefix, kwargs, seed=seed).save_pretrained(path)
        out[tag] = path
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama saved as an HF directory, one per test module."""
    from tests.models.conftest import save_case

    return str(save_case("llama", tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def llama(llama_dir: str) -> Any:
    """That Llama loaded (tests that update its weights write the same values back)."""
    from miles.models.loading import load_model

    return load_model(llama_dir)

"""``EngineConfig`` is the one declaration of the engine's settings: every field, set away from its
default, reaches an engine started by ``miles serve`` and one started from the argv the Ray
placement writes (both read back from ``/get_server_info``), or is refused by name. A field added
to ``EngineConfig`` fails here until it travels (or is deliberately listed as refused)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from miles.config import SPECS, ConfigError, EngineConfig, MilesConfig, ModelConfig
from miles.utils.dataclass_flags import FieldSpec
from tests.engine.conftest import ServerProcess, free_port, make_engine
from tests.models.conftest import save_case

# Settings a server refuses when set: what the built-in engine does not implement, and the
# rollout's settings of its client of the engines (EngineConfig.client_fields).
UNIMPLEMENTED = {
    "chunked_prefill_size",
    "speculative_algorithm",
    "speculative_draft_model_path",
    "speculative_num_steps",
    "speculative_eagle_topk",
    "speculative_num_draft_tokens",
    "tp_size",
    "dp_size",
    "ep_size",
}
CLIENT = {"server_concurrency", "router_ip", "router_port", "router_request_timeout_secs"}
NOT_FLAGS = {"sglang_passthrough"}  # verbatim SGLang options: --sglang-<their name>, refused below
ENGINE_SPECS = {s.name: s for s in SPECS.values() if s.section == "engine"}


def _other(spec: FieldSpec) -> Any:
    """A valid value of ``spec`` away from its default."""
    if spec.choices:
        return next(c for c in spec.choices if c != spec.default)
    if spec.kind == "bool":
        return not spec.default
    bounds = dict(spec.bounds)
    if spec.kind == "int":
        low = int(max(bounds.get("ge", 0), bounds.get("gt", -1) + 1))
        return low + 7 if spec.default is None else spec.default + 1
    if spec.kind == "float":
        if spec.default is None:
            return (bounds.get("gt", bounds.get("ge", 0.0)) + bounds.get("le", 1.0)) / 2
        return spec.default + 0.5
    if spec.kind == "str":
        return "elsewhere"
    raise AssertionError(f"{spec.flag}: no test value for a {spec.kind}")


def _flags(values: dict[str, Any]) -> list[str]:
    """The test's own writing of settings as flags (independent of engine_process.engine_flags)."""
    out: list[str] = []
    for name, value in values.items():
        flag = ENGINE_SPECS[name].flag
        out += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return out


TRAVELLING = {
    name: _other(spec)
    for name, spec in ENGINE_SPECS.items()
    if name not in UNIMPLEMENTED | CLIENT | NOT_FLAGS
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from miles.models.loading import load_model

    return load_model(save_case("llama", tmp_path_factory.mktemp("config_llama")))


def _served_config(url: str) -> EngineConfig:
    info = httpx.get(f"{url}/get_server_info", timeout=30).json()
    return EngineConfig(**{f.name: info[f.name] for f in dataclasses.fields(EngineConfig)})


def _serve(args: list[str], log: Path) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "miles", "serve", *args, "--port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(f"http://127.0.0.1:{port}", proc)


def test_the_refused_and_travelling_sets_cover_every_field():
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    assert EngineConfig.client_fields() == CLIENT
    assert set(TRAVELLING) | UNIMPLEMENTED | CLIENT | NOT_FLAGS == names
    for name in UNIMPLEMENTED:  # the engine's own list names each one
        (problem,) = EngineConfig(**{name: _other(ENGINE_SPECS[name])}).unimplemented()
        assert problem.startswith(ENGINE_SPECS[name].flag), problem


def test_every_engine_setting_reaches_an_engine_started_by_miles_serve(tiny_model_dir, tmp_path):
    expected = EngineConfig(**TRAVELLING)
    assert all(getattr(expected, n) != ENGINE_SPECS[n].default for n in TRAVELLING)
    server = _serve(["--hf-checkpoint", tiny_model_dir, *_flags(TRAVELLING)], tmp_path / "serve.log")
    try:
        server.wait(120)
        assert _served_config(server.url) == expected
    finally:
        server.stop()


@pytest.mark.parametrize("name", sorted(UNIMPLEMENTED | CLIENT))
def test_miles_serve_refuses_what_no_server_does_by_name(name, capsys):
    from miles.cli import main

    flag = ENGINE_SPECS[name].flag
    assert main(["serve", "--hf-checkpoint", "m", *_flags({name: _other(ENGINE_SPECS[name])})]) == 2
    err = capsys.readouterr().err
    assert err.startswith("miles: error: ") and flag in err, err


def test_miles_serve_refuses_sglang_options_the_engine_lacks(capsys):
    from miles.cli import main

    assert main(["serve", "--hf-checkpoint", "m", "--sglang-attention-backend", "fa3"]) == 2
    assert (
        "--sglang-attention-backend is an SGLang server option that the built-in engine does not implement"
        in (capsys.readouterr().err)
    )


def test_the_ray_engine_argv_carries_every_engine_setting(tiny_model_dir, tmp_path):
    """``engine_process.serve_arguments`` (what each Ray engine actor starts) writes the run's
    engine settings with the KV size its actor computed; ``miles serve`` parses them back whole
    and the server it starts reports them. The rollout client's settings stay with the trainer."""
    from miles.cli import build_parser, engine_config_of
    from miles.orchestrate.engine_process import EngineProcess, serve_arguments

    client = {n: _other(ENGINE_SPECS[n]) for n in CLIENT}
    engine = EngineConfig(**TRAVELLING, **client)
    config = MilesConfig(model=ModelConfig(hf_checkpoint=tiny_model_dir), engine=engine)
    argv = serve_arguments(config, "float32", TRAVELLING["max_total_tokens"])
    assert not any(ENGINE_SPECS[n].flag in argv for n in CLIENT)
    parser, _ = build_parser("serve")
    parsed = engine_config_of(parser.parse_args(["serve", *argv]))
    expected = EngineConfig(**TRAVELLING)  # the client's settings at their defaults
    assert parsed == expected
    proc = EngineProcess(argv, log_path=tmp_path / "engine.log").start()
    try:
        proc.wait_healthy(120)
        assert _served_config(proc.url) == expected
    finally:
        proc.stop()


def test_the_settings_are_checked_however_the_config_is_built():
    with pytest.raises(ConfigError, match=r"^--sglang-page-size must be >= 1, got 0$"):
        EngineConfig(page_size=0)
    with pytest.raises(ConfigError, match="--sglang-log-level must be one of debug, info"):
        EngineConfig(log_level="loud")  # type: ignore[arg-type]


def test_the_engine_refuses_what_it_does_not_implement(llama):
    with pytest.raises(ValueError, match=r"--sglang-speculative-algorithm \(speculative decoding\)"):
        make_engine(llama, num_blocks=8, speculative_algorithm="EAGLE")
    with pytest.raises(ValueError, match="batch-invariant kernels"):
        make_engine(llama, num_blocks=8, enable_deterministic_inference=True)
    with pytest.raises(ValueError, match="num_blocks or config.max_total_tokens"):
        make_engine(llama)
    engine = make_engine(llama, max_total_tokens=100, page_size=8)
    assert engine.allocator.num_blocks == 13 and engine.config.max_total_tokens == 100
    assert engine.config.context_length == engine.context_length == llama.spec.max_position_embeddings


def test_llm_takes_the_engine_settings_by_their_names(tmp_path):
    from miles.engine.llm import LLM

    with pytest.raises(TypeError, match="unknown engine setting 'block_size'"):
        LLM(str(tmp_path), block_size=4)
    with pytest.raises(ConfigError, match="--sglang-max-running-requests must be >= 1"):
        LLM(str(tmp_path), max_running_requests=0)  # refused before anything loads


def test_update_weight_buffer_size_sizes_the_embedded_push(arith_world, tmp_path, monkeypatch):
    """Regression: the embedded placement pushed weights in 512 MiB buckets whatever
    ``--update-weight-buffer-size`` said. The real bucketing runs; the wrapper only records."""
    import miles.orchestrate.local as local
    from miles.cli import main
    from tests.orchestrate.helpers import train_argv

    real = local.iter_weight_buckets
    seen: list[tuple[int, int]] = []  # (bucket_bytes asked, buckets yielded)

    def recording(model: Any, dtype: Any, bucket_bytes: int) -> Any:
        buckets = list(real(model, dtype, bucket_bytes))
        seen.append((bucket_bytes, len(buckets)))
        return iter(buckets)

    monkeypatch.setattr(local, "iter_weight_buckets", recording)
    argv = train_argv(
        arith_world, tmp_path / "run", "--num-rollout", "1", "--update-weight-buffer-size", "4096"
    )
    assert main(argv) == 0
    assert seen and all(size == 4096 for size, _ in seen), seen
    assert all(n > 1 for _, n in seen)  # the model is larger than one 4 KiB bucket

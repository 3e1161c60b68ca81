"""The Ray placement on CPU with a local Ray cluster: trainer ranks over gloo, ``miles serve``
engines owned by actors, the real sglang-router, the three weight-sync transports, engine crash
recovery and independently deployed engines."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from miles.config import parse_train_args
from miles.orchestrate.loop import Run, load_rollout_data, train_loop
from miles.rollout.dump import load_rollout_dump
from miles.utils.metrics import MetricsLogger, read_metrics
from tests.orchestrate.helpers import train_argv

ray = pytest.importorskip("ray")
pytest.importorskip("sglang_router")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module (logical CPUs: bundles, not cores)."""
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})  # fmt: skip
    yield
    ray.shutdown()


def _run(world: Path, run_dir: Path, *extra: str, during: Any = None) -> tuple[list[dict[str, Any]], Any]:
    """Build the Ray placement for ``miles train`` flags, run the loop, check the engines hold
    the trainer's weights exactly, and close. Returns the metric rows and the placement."""
    from miles.orchestrate.ray import RayPlacement

    config = parse_train_args(train_argv(world, run_dir, *extra)[1:])
    assert config.placement.use_ray
    data = load_rollout_data(config)
    placement = RayPlacement.start(config, data.demand, run_dir=run_dir)
    logger = MetricsLogger(run_dir)
    try:
        assert_engines_run_the_config(placement)
        if during is not None:
            during(placement)
        train_loop(Run.assemble(config, data, placement), logger)
        placement.wait_in_service()  # a restart still in flight
        assert_engines_hold(placement)
        placement.final_weights = placement.trainer_weights()
    finally:
        logger.close()
        placement.stop()
    return read_metrics(run_dir), placement


def assert_engines_run_the_config(placement: Any) -> None:
    """The engines Ray started (not external ones) report the run's ``EngineConfig`` at
    ``/get_server_info``: every setting of an engine, with the KV size (and the model's context
    length) their actor resolved; the rollout client's settings are not the engines'."""
    from miles.config import EngineConfig

    defaults = EngineConfig()
    run = placement.config.engine
    for url in placement.engine_urls if placement.engines else []:
        info = httpx.get(f"{url}/get_server_info", timeout=30).json()
        served = EngineConfig(**{f.name: info[f.name] for f in dataclasses.fields(EngineConfig)})
        expected = dataclasses.replace(
            run,
            **{name: getattr(defaults, name) for name in EngineConfig.client_fields()},
            max_total_tokens=run.max_total_tokens or served.max_total_tokens,
            context_length=run.context_length or served.context_length,
        )
        assert served == expected, url


def assert_engines_hold(placement: Any) -> None:
    """Every engine's every parameter equals the trainer's (torch.equal, through HTTP, with the
    run's admin key: weight read-back is an admin endpoint)."""
    weights = placement.trainer_weights()
    admin = {"Authorization": f"Bearer {placement.admin_key}"}
    for url in placement.engine_urls:
        version = httpx.get(f"{url}/get_weight_version", timeout=10).json()["weight_version"]
        assert version == str(placement.version), (url, version)
        for name, tensor in weights.items():
            r = httpx.post(
                f"{url}/get_weights_by_name",
                json={"name": name, "truncate_size": 1 << 20},
                headers=admin,
                timeout=30,
            )
            assert r.status_code == 200, r.text
            served = torch.tensor(r.json(), dtype=torch.float32)
            assert torch.equal(served, tensor.float()), f"{url}: {name} differs from the trainer's"


KEYS = ("rollout/raw_reward", "train/loss", "train/grad_norm", "train/train_rollout_logprob_abs_diff",
        "perf/rollout_time", "perf/train_time", "perf/update_weights_time")  # fmt: skip


def test_disaggregated_two_ranks_two_engines_broadcast_and_resume(arith_world, tmp_path, ray_cluster):
    """2 trainer ranks (FSDP2 over gloo, experts sharded over both: EP 2) + 2 engines behind
    sglang-router, weights by broadcast; then a resumed run (``--load``) continues from the saved step."""
    flags = ("--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "2", "--num-rollout", "2",
             "--expert-model-parallel-size", "2",
             "--use-kl-loss", "--kl-loss-coef", "0.5", "--save", str(tmp_path / "ckpt"))  # fmt: skip
    rows, placement = _run(arith_world, tmp_path / "run", *flags)
    assert placement.router is not None and placement.transport == "distributed"
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert all(k in r for k in KEYS), sorted(r)
        assert r["train/grad_norm"] > 0 and r["rollout/failed_samples"] == 0
    # the metric names match the embedded run's
    from miles.cli import main

    assert (
        main(
            train_argv(
                arith_world,
                tmp_path / "local",
                "--num-rollout",
                "1",
                "--use-kl-loss",
                "--kl-loss-coef",
                "0.5",
            )
        )
        == 0
    )
    assert set(read_metrics(tmp_path / "local")[0]) == set(rows[0])
    # a crashed trainer resumes from its last checkpoint: step 2 follows, weights re-pushed
    resumed, placement = _run(arith_world, tmp_path / "run2", *flags[:-2], "--num-rollout", "3",
                              "--load", str(tmp_path / "ckpt"), "--save-hf", str(tmp_path / "hf"))  # fmt: skip
    resumed_weights = placement.final_weights
    assert [r["step"] for r in resumed] == [2] and placement.version == 3
    # --save-hf gathered the FSDP2 + EP shards of both ranks: the export holds the trainer's weights
    from miles.models.loading import load_model

    exported = dict(load_model(tmp_path / "hf").named_parameters())
    for name, tensor in resumed_weights.items():
        assert torch.equal(exported[name], tensor), name


def test_colocated_shared_memory_handover(arith_world, tmp_path, ray_cluster):
    rows, placement = _run(arith_world, tmp_path / "run", "--actor-num-gpus-per-node", "2", "--colocate",
                           "--placement-backend", "ray", "--num-rollout", "2")  # fmt: skip
    assert placement.transport == "tensor" and len(placement.engine_urls) == 2
    assert [r["step"] for r in rows] == [0, 1] and all(r["perf/update_weights_time"] > 0 for r in rows)


def test_disk_transport_one_rank_one_engine(arith_world, tmp_path, ray_cluster):
    keys: dict[str, Any] = {}

    def probe(placement: Any) -> None:  # an engine Ray started: its admin endpoints need the run's key
        url = placement.engine_urls[0]
        keys["no_key"] = httpx.post(f"{url}/continue_generation", json={}, timeout=30).status_code
        keys["key"] = httpx.post(f"{url}/continue_generation", json={}, timeout=30,
                                 headers={"Authorization": f"Bearer {placement.admin_key}"}).status_code  # fmt: skip

    rows, placement = _run(arith_world, tmp_path / "run", "--placement-backend", "ray", "--rollout-num-gpus", "1",
                           "--update-weight-transport", "disk", "--num-rollout", "2", during=probe)  # fmt: skip
    assert keys == {"no_key": 401, "key": 200} and len(placement.admin_key) >= 32
    assert placement.router is None and placement.transport == "disk"
    assert all(r["perf/update_weights_time"] > 0 for r in rows)
    written = list((tmp_path / "run" / "weight_sync").iterdir())
    assert [p.name for p in written] == ["version_2"]  # older versions are removed


@contextlib.contextmanager
def _killer() -> Iterator[tuple[Any, list[int | None]]]:
    """``(during, fired)``: ``during(placement)`` starts a thread that SIGKILLs engine 0 once the
    weights are at version 1 and it has requests in flight; ``fired`` gets the version it was
    killed at (``None``: never). Leaving the block stops a watcher that never fired."""
    done = threading.Event()
    fired: list[int | None] = []

    def watch(placement: Any) -> None:
        def kill() -> None:
            fired.append(placement.kill_engine_when_busy(0, 1, done))

        threading.Thread(target=kill, daemon=True).start()

    try:
        yield watch, fired
    finally:
        done.set()


def test_engine_killed_mid_rollout_is_restarted_and_nothing_is_lost(arith_world, tmp_path, ray_cluster):
    dump = tmp_path / "dump"
    flags = ("--placement-backend", "ray", "--rollout-num-gpus", "2", "--num-rollout", "3",
             "--rollout-batch-size", "8", "--rollout-max-response-len", "64",
             "--use-fault-tolerance", "--rollout-health-check-interval", "0.5", "--rollout-health-check-timeout", "2",
             "--save-debug-rollout-data", str(dump))  # fmt: skip
    # Engine 0 is SIGKILLed during step 1's rollout, while it has requests in flight.
    with _killer() as (watch, fired):
        rows, placement = _run(arith_world, tmp_path / "run", *flags, during=watch)
    assert fired == [1], "engine 0 was never killed mid-rollout"
    assert placement.version == 3 and placement.monitor.recoveries >= 1
    assert not placement.monitor.errors
    for step, r in enumerate(rows):
        assert r["rollout/failed_samples"] == 0 and r["rollout/num_samples"] == 32, (step, r)
    samples = [s for step in range(3) for g in load_rollout_dump(dump / f"rollout_{step}.pt")
               for s in g.samples]  # fmt: skip
    indices = [s.index for s in samples]
    assert sorted(indices) == list(range(96))  # every sample once: none lost, none duplicated
    assert all(s.status.trainable for s in samples)


def test_external_engines_synced_by_broadcast_and_disk(arith_world, tmp_path, ray_cluster):
    from miles.orchestrate.engine_process import EngineProcess

    args = ["--hf-checkpoint", str(arith_world / "model"), "--sglang-max-total-tokens", "2048"]
    servers = [EngineProcess(args, log_path=tmp_path / f"ext{i}.log").start() for i in range(2)]
    try:
        for s in servers:
            s.wait_healthy(120)
        addrs = [s.url.removeprefix("http://") for s in servers]
        for transport, n in zip(("distributed", "disk"), itertools.count(1)):
            rows, placement = _run(arith_world, tmp_path / f"run{n}", "--rollout-external-engine-addrs", *addrs,
                                   "--update-weight-transport", transport, "--num-rollout", "1")  # fmt: skip
            assert placement.engines == [] and placement.router is not None
            assert rows[0]["rollout/failed_samples"] == 0
            assert all(s.alive() for s in servers)  # not ours to stop
    finally:
        for s in servers:
            s.stop()


def test_weight_sync_right_after_an_engine_died_goes_to_the_others(arith_world, tmp_path, ray_cluster):
    """An engine dies between two health checks and a weight sync reaches it first: the live
    engine gets the weights, the sync does not fail, and the dead one is re-synced on recovery."""
    from miles.orchestrate.ray import RayPlacement

    argv = train_argv(arith_world, tmp_path / "run", "--placement-backend", "ray", "--rollout-num-gpus", "2",
                 "--num-rollout", "1", "--use-fault-tolerance", "--rollout-health-check-interval", "5")  # fmt: skip
    config = parse_train_args(argv[1:])
    placement = RayPlacement.start(config, load_rollout_data(config).demand, run_dir=tmp_path / "run")
    try:
        placement.kill_engine(0)
        assert placement.push_weights(1) > 0 and placement.version == 1
        alive = placement.engine_urls[1]
        assert httpx.get(f"{alive}/get_weight_version", timeout=10).json()["weight_version"] == "1"
        placement.wait_in_service(120)  # the monitor restarts engine 0 and re-syncs version 1
        assert placement.monitor.recoveries == 1 and not placement.monitor.errors
        assert_engines_hold(placement)
    finally:
        placement.stop()


def test_engine_killed_during_a_fully_async_run_loses_and_duplicates_nothing(
    arith_world, tmp_path, ray_cluster
):
    """The kill above, while a rollout worker keeps generating through weight updates (partial
    rollout, retracted at each update): every prompt is trained once, every sample index once."""
    dump = tmp_path / "dump"
    flags = ("--placement-backend", "ray", "--rollout-num-gpus", "2", "--num-rollout", "4",
             "--rollout-batch-size", "8", "--rollout-max-response-len", "64",
             "--async-mode", "fully-async", "--max-weight-staleness", "1", "--partial-rollout",
             "--pause-generation-mode", "retract",
             "--use-fault-tolerance", "--rollout-health-check-interval", "0.5", "--rollout-health-check-timeout", "2",
             "--save-debug-rollout-data", str(dump))  # fmt: skip
    with _killer() as (watch, fired):
        rows, placement = _run(arith_world, tmp_path / "run", *flags, during=watch)
    assert fired == [1], "engine 0 was never killed while the worker generated"
    assert placement.version == 4 and placement.monitor.recoveries >= 1
    rows = [r for r in rows if "perf/step_time" in r]
    assert all(r["rollout/failed_samples"] == 0 and r["rollout/num_samples"] == 32 for r in rows)
    assert sum(r["async/dropped_groups"] + r["async/filtered_groups"] for r in rows) == 0
    samples = [
        s for step in range(4) for g in load_rollout_dump(dump / f"rollout_{step}.pt") for s in g.samples
    ]
    groups = [s.group_index for s in samples[::4]]
    assert sorted(groups) == list(range(32))  # every prompt once, none lost
    assert len({s.index for s in samples}) == len(samples) == 128  # no sample twice
    assert all(s.status.trainable for s in samples)

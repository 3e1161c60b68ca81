"""The Ray placement: the same trainer and engine as the embedded run, as Ray actors.

Ray is imported here only (and lazily): ``miles train`` in the embedded placement never loads it.

Where each actor goes is :func:`miles.orchestrate.ray_layout.ray_layout`, a pure function of the
flags (trainer ranks in one placement group, engines in a second one or sharing the ranks'
bundles); :meth:`RayPlacement.start` turns it into placement groups and actors:

- each trainer rank is a :class:`TrainerWorker` actor, all in one torch.distributed group (NCCL
  on GPU, gloo on CPU);
- each engine is a ``miles serve`` process owned by an :class:`EngineServer` actor (so a
  crashed server is seen, and restarted on the same port, by an actor that survives it);
  ``--rollout-external-engine-addrs`` replaces them with servers deployed on their own;
- with more than one engine the rollout reaches them through sglang-router, started here;
- the engines' admin endpoints (weights, memory, pause) take an admin key: ``$MILES_ADMIN_API_KEY``
  when the driver has it (external engines must be started with the same), else one generated
  for the run. Engines get it through their environment (not their command line), the trainer
  actors through their runtime environment, and every admin call Miles makes sends it.

The placement owns trainers and engines only: the driver (the loop's process) keeps the data,
the rollout manager and the metrics, and reaches the engines through :meth:`RayPlacement.engine_client`.
Every call that reaches the trainer ranks goes through :meth:`RayPlacement._on_trainers`, under one lock, so the
ranks see collective calls in the same order even when the health monitor re-syncs a restarted
engine while the loop trains.

On a machine without GPUs CPUs are the resource, so the whole path runs (and is tested) on CPU.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from miles.config import MilesConfig
from miles.engine.client import ADMIN_KEY_ENV, EngineClient, EngineRequestError, HttpEngineClient, http_call
from miles.models.loading import load_config
from miles.orchestrate.build import compute_dtype, default_kv_tokens
from miles.orchestrate.engine_process import EngineProcess, free_port, serve_arguments, wait_healthy_url
from miles.orchestrate.health import HealthMonitor
from miles.orchestrate.placement import Part
from miles.orchestrate.ray_layout import RayLayout, RayPlacementError, ray_layout
from miles.orchestrate.router import SglangRouter
from miles.orchestrate.trainer_worker import TrainerWorker, node_ip
from miles.orchestrate.weight_transport import _post
from miles.types import Group

logger = logging.getLogger(__name__)

# Environment the actors need from the driver's (a `ray start` cluster does not pass it on).
_FORWARDED_ENV = ("PYTHONPATH", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")
_FORWARDED_PREFIXES = ("NCCL_", "TORCH_", "NVSHMEM_", "MILES_", "HF_", "CUDA_LAUNCH")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayPlacementError("the Ray placement needs Ray: pip install 'miles[ray]'") from None
    return ray


def _env_vars() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _FORWARDED_ENV or k.startswith(_FORWARDED_PREFIXES)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class EngineServer:
    """Ray actor body: one ``miles serve`` process on this actor's node and device."""

    def __init__(
        self, config: MilesConfig, demand: tuple[int, int], index: int, log_dir: str, admin_key: str
    ) -> None:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        assert config.model.hf_checkpoint is not None
        spec = load_config(config.model.hf_checkpoint)
        dtype = compute_dtype(config, device)
        tokens = config.engine.max_total_tokens or default_kv_tokens(
            config, spec, getattr(torch, dtype), demand, device
        )
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.proc = EngineProcess(
            serve_arguments(config, dtype, tokens),
            host=_ray().util.get_node_ip_address(),
            log_path=Path(log_dir) / f"engine_{index}.log",
            admin_key=admin_key,
        ).start()

    def wait_healthy(self, timeout_s: float) -> str:
        self.proc.wait_healthy(timeout_s)
        return self.proc.url

    def alive(self) -> bool:
        return self.proc.alive()

    def kill(self) -> None:
        self.proc.kill()

    def restart(self, timeout_s: float) -> str:
        self.proc.restart(timeout_s)
        return self.proc.url

    def stop(self) -> None:
        self.proc.stop()


def rollout_client(config: MilesConfig, url: str) -> HttpEngineClient:
    """The rollout's client of the engines at ``url`` (the router, or the one engine): each answer
    awaited up to ``--sglang-router-request-timeout-secs``; with ``--use-fault-tolerance`` it
    retries long enough for a crashed engine to be restarted."""
    ft = config.placement.use_fault_tolerance
    return HttpEngineClient(
        url,
        timeout_s=config.engine.router_request_timeout_secs,
        max_retries=30 if ft else 5,
        max_backoff_s=5.0,
    )


def _master_address() -> tuple[str, int]:
    return node_ip(), free_port("0.0.0.0")


def _init_ray(layout: RayLayout) -> bool:
    """Join ``$RAY_ADDRESS`` or start a local cluster of our own; False when Ray was running already."""
    ray = _ray()
    if ray.is_initialized():
        return False
    env = {"env_vars": _env_vars()}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:  # never a stale /tmp/ray/ray_current_cluster; logical CPUs, not cores
        cpus = max(os.cpu_count() or 1, layout.logical_cpus)
        ray.init(
            address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=False
        )
    return True


def _placement_groups(layout: RayLayout, use_gpu: bool) -> list[Any]:
    """One PACK placement group per entry of ``layout.group_sizes``, ready."""
    ray = _ray()
    from ray.util.placement_group import placement_group

    bundle = {"CPU": 1, **({"GPU": 1} if use_gpu else {})}
    pgs = [placement_group([dict(bundle) for _ in range(n)], strategy="PACK") for n in layout.group_sizes]
    ray.get([pg.ready() for pg in pgs], timeout=600)
    return pgs


def _on_bundle(pgs: list[Any], share: float, use_gpu: bool, where: tuple[int, int]) -> dict[str, Any]:
    """Ray ``.options`` for an actor on bundle ``where = (group, bundle)``, taking ``share`` of it."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group, index = where
    strategy = PlacementGroupSchedulingStrategy(
        placement_group=pgs[group], placement_group_bundle_index=index
    )
    return {"num_cpus": share, **({"num_gpus": share} if use_gpu else {}), "scheduling_strategy": strategy}


@dataclass
class RayPlacement:
    """The trainer ranks and engines of one Ray run (a :class:`~miles.orchestrate.placement.Placement`,
    started by :meth:`start`)."""

    config: MilesConfig
    layout: RayLayout
    trainers: list[Any]
    engines: list[Any]  # EngineServer actor handles; empty with external engines
    engine_urls: list[str]
    router: SglangRouter | None
    use_gpu: bool
    placement_groups: list[Any]
    started_ray: bool
    admin_key: str = field(default="", repr=False)  # the engines' (see the module docstring)
    monitor: HealthMonitor | None = None
    version: int = 0
    # Reentrant: a recovery holds it across reading the current version and re-syncing.
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _out_of_service: set[int] = field(default_factory=set)
    _client: HttpEngineClient | None = None

    @property
    def transport(self) -> str:
        return self.layout.transport

    @property
    def num_engines(self) -> int:
        return len(self.engine_urls)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def start(
        cls, config: MilesConfig, demand: tuple[int, int], *, run_dir: str | os.PathLike[str] = "runs/ray"
    ) -> RayPlacement:
        """Start the trainer ranks and the engines :func:`~miles.orchestrate.ray_layout.ray_layout`
        places (engines' KV caches sized for ``demand``), the router in front of several engines,
        the weight transport and, with ``--use-fault-tolerance``, the health monitor."""
        layout = ray_layout(config.placement)
        ray = _ray()
        started = _init_ray(layout)
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        pgs = _placement_groups(layout, use_gpu)
        on = functools.partial(_on_bundle, pgs, layout.share, use_gpu)
        master = ray.get(
            ray.remote(_master_address).options(**on(layout.trainer_bundle(0)), max_retries=0).remote()
        )
        admin_key = os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(32)
        keyed = {"runtime_env": {"env_vars": {ADMIN_KEY_ENV: admin_key}}}  # the weight senders read it
        world, worker_cls = layout.trainer_ranks, ray.remote(TrainerWorker)
        trainers = [
            worker_cls.options(**on(layout.trainer_bundle(r)), **keyed).remote(config, r, world, master)
            for r in range(world)
        ]
        log_dir = str(Path(run_dir).resolve() / "engines")
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        engine_cls = ray.remote(EngineServer)
        engines = [
            engine_cls.options(**on(layout.engine_bundle(i))).remote(config, demand, i, log_dir, admin_key)
            for i in range(layout.engines)
        ]
        ray.get([t.ready.remote() for t in trainers])
        urls = (
            ray.get([e.wait_healthy.remote(600.0) for e in engines])
            if engines
            else list(layout.external_urls)
        )
        router = None
        if len(urls) > 1:
            router = SglangRouter(host=node_ip(), log_path=Path(log_dir) / "router.log").start()
            for url in urls:
                router.add(url)
        directory = str(Path(run_dir).resolve() / "weight_sync")
        ray.get([t.set_weight_transport.remote(layout.transport, master_address=master[0], directory=directory,
                                               engines=urls) for t in trainers])  # fmt: skip
        placement = cls(
            config, layout, trainers, engines, list(urls), router, use_gpu, pgs, started, admin_key
        )
        placement._client = rollout_client(config, router.url if router else urls[0])
        if layout.external_urls:  # servers deployed on their own may hold any weights: start from ours
            placement.push_weights(0)
        p = config.placement
        if p.use_fault_tolerance:
            placement.monitor = HealthMonitor(
                placement._in_service_urls,
                placement.recover,
                process_alive=placement._process_alive if engines else None,
                interval_s=p.rollout_health_check_interval,
                timeout_s=p.rollout_health_check_timeout,
                first_wait_s=p.rollout_health_check_first_wait,
            ).start()
        return placement

    # ---- the loop's interface -------------------------------------------------------------------

    def _on_trainers(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every trainer rank (same order on all: one lock) and wait."""
        ray = _ray()
        with self._lock:
            return list(ray.get([getattr(t, method).remote(*args, **kwargs) for t in self.trainers]))

    def _engine_post(self, path: str) -> None:
        for url in self._in_service_urls():
            try:
                _post(url, path, {}, key=self.admin_key)
            except Exception:
                if self.monitor is None or self._alive(url):
                    raise  # a dead engine is the monitor's; a live one refusing is an error

    def _alive(self, url: str) -> bool:
        """The engine at ``url`` runs (its actor says so) and answers ``/health``."""
        i = self.engine_urls.index(url)
        if self.engines and not _ray().get(self.engines[i].alive.remote(), timeout=60):
            return False
        try:
            return http_call("GET", f"{url}/health", timeout_s=5.0, max_response_bytes=1 << 16).status == 200
        except (httpx.HTTPError, EngineRequestError):
            return False

    def engine_client(self) -> EngineClient:
        assert self._client is not None, "start() sets it"
        return self._client

    def train(self, groups: list[Group], step: int) -> dict[str, float]:
        metrics = dict(self._on_trainers("train", groups, step)[0])
        if self.monitor is not None:
            metrics["rollout/engine_recoveries"] = float(self.monitor.recoveries)
        return metrics

    def push_weights(self, version: int) -> float:
        with self._lock:  # a recovery re-syncs either before (old version) or after (this one)
            seconds = self._push_to_live(version)
            self.version = version
        return float(seconds)

    def _offloads(self, part: Part) -> bool:
        """Offloading takes turns on a shared device: only colocated on GPUs, as the flags ask."""
        p = self.config.placement
        wanted = p.offload_rollout if part == "engines" else p.offload_train
        return bool(wanted) and p.colocate and self.use_gpu

    def sleep(self, part: Part) -> None:
        if self._offloads(part):
            if part == "engines":
                self._engine_post("/release_memory_occupation")
            else:
                self._on_trainers("sleep")

    def wake(self, part: Part) -> None:
        if self._offloads(part):
            if part == "engines":
                self._engine_post("/resume_memory_occupation")
            else:
                self._on_trainers("wake_up")

    def save_checkpoint(self, directory: str, step: int, extra: dict[str, Any]) -> None:
        self._on_trainers("save_checkpoint", directory, step, extra)

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        return dict(self._on_trainers("load_checkpoint", directory)[0])

    def save_hf(self, directory: str) -> None:
        self._on_trainers("save_hf", str(Path(directory).resolve()))

    def trainer_weights(self) -> dict[str, torch.Tensor]:
        """Rank 0's full copy of the policy weights (for tests and checks)."""
        return dict(self._on_trainers("weights")[0])

    # ---- fault tolerance ----------------------------------------------------------------------

    def _push_to_live(self, version: int) -> float:
        """Push to the engines in service. With fault tolerance, a failed sync is retried once on
        the engines that are in service and alive now: one that died since the last health check
        is the monitor's (it re-syncs the engine when it is back)."""
        targets = self._in_service_urls()
        try:
            return float(max(self._on_trainers("push_weights", version, targets)))
        except Exception:
            if self.monitor is None:
                raise
            live = [u for u in self._in_service_urls() if self._alive(u)]
            logger.warning("weight sync to %s failed; once more to the live engines %s", targets, live)
            for url in targets:
                self._on_trainers("forget_engine", url)
            return float(max(self._on_trainers("push_weights", version, live)))

    def _in_service_urls(self) -> list[str]:
        return [u for i, u in enumerate(self.engine_urls) if i not in self._out_of_service]

    def _process_alive(self, index: int) -> bool:
        url = self._in_service_urls()[index]
        i = self.engine_urls.index(url)
        return bool(_ray().get(self.engines[i].alive.remote(), timeout=60))

    def recover(self, index: int) -> None:
        """Bring in-service engine ``index`` back: out of the router, restarted (or, external,
        waited for), weights re-synced to the current version, back into the router."""
        ray = _ray()
        url = self._in_service_urls()[index]
        i = self.engine_urls.index(url)
        self._out_of_service.add(i)
        try:
            if self.router is not None:
                self.router.remove(url)
            if self.engines:
                ray.get(self.engines[i].restart.remote(600.0))
            else:
                wait_healthy_url(url, 600.0)
            with self._lock:  # the version read and the re-sync, with no push in between
                self._on_trainers("forget_engine", url)
                # A restarted server holds the initial checkpoint's weights: version 0.
                resynced = self.version == 0 or (
                    self.transport == "disk" and self._on_trainers("resync_from_disk", self.version, [url])[0]
                )
                if not resynced:
                    self._on_trainers("push_weights", self.version, [url])
            if self.router is not None:
                self.router.add(url)
        finally:
            self._out_of_service.discard(i)

    def wait_in_service(self, timeout_s: float = 300.0) -> None:
        """Block until every engine is in service and healthy (a recovery in flight finished)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._out_of_service and all(
                self.monitor is None or self.monitor.healthy(i, u) for i, u in enumerate(self.engine_urls)
            ):
                return
            time.sleep(0.2)
        raise TimeoutError(f"engines {sorted(self._out_of_service)} still out of service after {timeout_s} s")

    def kill_engine(self, index: int) -> None:
        """SIGKILL engine ``index``'s server (fault-injection in tests and drills)."""
        _ray().get(self.engines[index].kill.remote())

    def kill_engine_when_busy(
        self, index: int, version: int, stop: threading.Event, timeout_s: float = 300.0
    ) -> int | None:
        """Fault injection: wait until the weights are at ``version`` and engine ``index`` has
        requests in flight, then SIGKILL it; return the version it was killed at, or ``None``
        if ``stop`` was set or ``timeout_s`` passed first. Run it in a thread beside the loop."""
        url = self.engine_urls[index]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not stop.is_set():
            if self.version == version:
                try:
                    info = http_call("GET", f"{url}/get_server_info", timeout_s=5, max_response_bytes=1 << 20)
                    state = info.json()["internal_states"][0]
                except (httpx.HTTPError, EngineRequestError, ValueError, KeyError):
                    continue
                if state["num_running"] + state["num_waiting"] > 0:
                    self.kill_engine(index)
                    return self.version
            time.sleep(0.002)
        return None

    def stop(self) -> None:
        ray = _ray()
        if self.monitor is not None:
            self.monitor.stop()
        if self.router is not None:
            self.router.stop()
        for fn in (lambda: ray.get([e.stop.remote() for e in self.engines], timeout=60),
                   lambda: self._on_trainers("close")):  # fmt: skip
            try:
                fn()
            except Exception:
                logger.exception("stopping the Ray placement")
        for actor in [*self.engines, *self.trainers]:
            ray.kill(actor)
        from ray.util.placement_group import remove_placement_group

        for pg in self.placement_groups:
            remove_placement_group(pg)
        if self.started_ray:
            ray.shutdown()


__all__ = ["EngineServer", "RayPlacement", "RayPlacementError", "rollout_client"]

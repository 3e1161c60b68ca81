"""The Ray placement: the same trainer and engine as the embedded run, as Ray actors.

Ray is imported here only (and lazily): ``miles train`` in the embedded placement never loads it.

Layout (DESIGN.md §8; slime's ``create_placement_groups`` in spirit):

- one bundle per trainer rank (``{"CPU": 1}``, plus ``{"GPU": 1}`` on a GPU cluster), PACK
  strategy, across ``--actor-num-nodes`` × ``--actor-num-gpus-per-node``; each rank is a
  :class:`TrainerWorker` actor, all in one torch.distributed group (NCCL on GPU, gloo on CPU);
- disaggregated: one more bundle per engine (``--rollout-num-gpus`` / ``--rollout-num-gpus-per-engine``);
  colocated (``--colocate``): engine ``i`` shares trainer rank ``i``'s bundle, each taking half;
- each engine is a ``miles serve`` process owned by an :class:`EngineServer` actor (so a
  crashed server is seen, and restarted on the same port, by an actor that survives it);
  ``--rollout-external-engine-addrs`` replaces them with servers deployed on their own;
- with more than one engine the rollout reaches them through sglang-router, started here;
- the engines' admin endpoints (weights, memory, pause) take an admin key: ``$MILES_ADMIN_API_KEY``
  when the driver has it (external engines must be started with the same), else one generated
  for the run. Engines get it through their environment (not their command line), the trainer
  actors through their runtime environment, and every admin call Miles makes sends it.

This process (the driver) keeps the data, the rollout manager and the metrics; every call that
reaches the trainer ranks goes through :meth:`RayPlacement._on_trainers`, under one lock, so the
ranks see collective calls in the same order even when the health monitor re-syncs a restarted
engine while the loop trains.

On a machine without GPUs CPUs are the resource, so the whole path runs (and is tested) on CPU.
"""

from __future__ import annotations

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
from miles.engine.client import ADMIN_KEY_ENV, EngineRequestError, HttpEngineClient, http_call
from miles.models.loading import load_config, load_tokenizer
from miles.orchestrate.engine_process import EngineProcess, free_port, serve_arguments, wait_healthy_url
from miles.orchestrate.health import HealthMonitor
from miles.orchestrate.local import compute_dtype, default_kv_tokens, kv_demand
from miles.orchestrate.router import SglangRouter
from miles.orchestrate.trainer_worker import TrainerWorker, node_ip
from miles.orchestrate.weight_transfer import _post
from miles.rollout.dataset import PromptDataset, load_eval_datasets
from miles.rollout.manager import RolloutManager
from miles.types import Group

logger = logging.getLogger(__name__)

# Environment the actors need from the driver's (a `ray start` cluster does not pass it on).
_FORWARDED_ENV = ("PYTHONPATH", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")
_FORWARDED_PREFIXES = ("NCCL_", "TORCH_", "NVSHMEM_", "MILES_", "HF_", "CUDA_LAUNCH")


class RayPlacementError(RuntimeError):
    """A Ray layout that cannot be built (the message names the flags)."""


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


@dataclass
class RayPlacement:
    """Every component of one Ray run (built by :meth:`build`)."""

    config: MilesConfig
    tokenizer: Any
    dataset: PromptDataset
    eval_datasets: dict[str, PromptDataset]
    manager: RolloutManager
    trainers: list[Any]
    engines: list[Any]  # EngineServer actor handles; empty with external engines
    engine_urls: list[str]
    router: SglangRouter | None
    transport: str
    use_gpu: bool
    placement_groups: list[Any]
    started_ray: bool
    admin_key: str = field(default="", repr=False)  # the engines' (see the module docstring)
    monitor: HealthMonitor | None = None
    version: int = 0
    # Reentrant: a recovery holds it across reading the current version and re-syncing.
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _out_of_service: set[int] = field(default_factory=set)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls, config: MilesConfig, args: Any, *, run_dir: str | os.PathLike[str] = "runs/ray"
    ) -> RayPlacement:
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        p, m = config.placement, config.model
        assert m.hf_checkpoint is not None
        external = [u if "://" in u else f"http://{u}" for u in p.rollout_external_engine_addrs]
        world = p.actor_world_size
        if p.rollout_num_gpus_per_engine != 1:
            raise RayPlacementError(
                f"--rollout-num-gpus-per-engine {p.rollout_num_gpus_per_engine}: the built-in engine runs on one "
                "device (no tensor parallelism); use more engines instead"
            )
        n_engines = 0 if external else (p.rollout_num_gpus or 0)
        if not external and n_engines < 1:
            raise RayPlacementError(
                "the Ray placement needs engines: --colocate, --rollout-num-gpus N (disaggregated) "
                "or --rollout-external-engine-addrs"
            )
        transport = p.update_weight_transport
        if transport == "auto":
            transport = "tensor" if p.colocate else "distributed"
        if transport == "tensor" and not p.colocate:
            raise RayPlacementError(
                "--update-weight-transport tensor hands tensors over on a shared device: it needs --colocate "
                "(use distributed or disk)"
            )
        started = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, runtime_env={"env_vars": _env_vars()}, log_to_driver=False)
            else:  # a local cluster of our own (never a stale /tmp/ray/ray_current_cluster)
                need = world + (0 if p.colocate else n_engines) + 1  # logical CPUs, not cores
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
                         runtime_env={"env_vars": _env_vars()}, log_to_driver=False)  # fmt: skip
            started = True
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        bundle = {"CPU": 1, **({"GPU": 1} if use_gpu else {})}
        pgs = [placement_group([dict(bundle) for _ in range(world)], strategy="PACK")]
        if n_engines and not p.colocate:
            pgs.append(placement_group([dict(bundle) for _ in range(n_engines)], strategy="PACK"))
        ray.get([pg.ready() for pg in pgs], timeout=600)
        share = 0.5 if p.colocate else 1.0

        def on(pg: Any, i: int, **resources: Any) -> dict[str, Any]:
            gpu = {"num_gpus": share} if use_gpu else {}
            strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
            return {"num_cpus": share, **gpu, "scheduling_strategy": strategy, **resources}

        master = ray.get(ray.remote(_master_address).options(**on(pgs[0], 0), max_retries=0).remote())
        admin_key = os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(32)
        worker_cls = ray.remote(TrainerWorker)
        keyed = {"runtime_env": {"env_vars": {ADMIN_KEY_ENV: admin_key}}}  # the weight senders read it
        trainers = [
            worker_cls.options(**on(pgs[0], r), **keyed).remote(config, r, world, master)
            for r in range(world)
        ]
        tokenizer = load_tokenizer(m.hf_checkpoint)
        dataset = PromptDataset.from_config(config.rollout, tokenizer)
        evals = dict(load_eval_datasets(config.rollout.eval_datasets, config.rollout, tokenizer))
        spec = load_config(m.hf_checkpoint)
        engines: list[Any] = []
        log_dir = str(Path(run_dir).resolve() / "engines")
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        if not external:
            demand = kv_demand(config, spec, [dataset, *evals.values()])
            engine_cls = ray.remote(EngineServer)
            engine_pg = pgs[0] if p.colocate else pgs[1]
            engines = [
                engine_cls.options(**on(engine_pg, i % len(engine_pg.bundle_specs))).remote(
                    config, demand, i, log_dir, admin_key
                )
                for i in range(n_engines)
            ]
        ray.get([t.ready.remote() for t in trainers])
        urls = ray.get([e.wait_healthy.remote(600.0) for e in engines]) if engines else external
        router = None
        if len(urls) > 1:
            router = SglangRouter(host=node_ip(), log_path=Path(log_dir) / "router.log").start()
            for url in urls:
                router.add(url)
        directory = str(Path(run_dir).resolve() / "weight_sync")
        ray.get([t.set_weight_transport.remote(transport, master_address=master[0], directory=directory,
                                               engines=urls) for t in trainers])  # fmt: skip
        ft = p.use_fault_tolerance
        client = rollout_client(config, router.url if router else urls[0])
        r3 = config.use_rollout_routing_replay
        if r3 and not spec.is_moe:
            raise ValueError("--use-rollout-routing-replay needs an MoE model; this one is dense")
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        manager = RolloutManager(
            config.rollout,
            dataset,
            client,
            args=args,
            concurrency=config.engine.server_concurrency * len(urls),
            stop_token_ids=eos,
            routed_experts_top_k=spec.num_experts_per_tok if r3 else None,
        )
        placement = cls(config, tokenizer, dataset, evals, manager, trainers, engines, list(urls), router,
                        transport, use_gpu, pgs, started, admin_key)  # fmt: skip
        if external:  # servers deployed on their own may hold any weights: start from ours
            placement.push_weights(0)
        if ft:
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

    def train(self, groups: list[Group], step: int) -> dict[str, float]:
        colocated_gpu = self.config.placement.colocate and self.use_gpu
        if colocated_gpu and self.config.placement.offload_rollout:
            self._engine_post("/release_memory_occupation")
        if colocated_gpu and self.config.placement.offload_train:
            self._on_trainers("wake_up")
        metrics = dict(self._on_trainers("train", groups, step)[0])
        if self.monitor is not None:
            metrics["rollout/engine_recoveries"] = float(self.monitor.recoveries)
        return metrics

    def push_weights(self, version: int, *, send: bool = True) -> float:
        colocated_gpu = self.config.placement.colocate and self.use_gpu
        if colocated_gpu and self.config.placement.offload_rollout:
            self._engine_post("/resume_memory_occupation")
        seconds = 0.0
        if send:
            with self._lock:  # a recovery re-syncs either before (old version) or after (this one)
                seconds = self._push_to_live(version)
                self.version = version
        if colocated_gpu and self.config.placement.offload_train:
            self._on_trainers("sleep")
        return float(seconds)

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

    def close(self) -> None:
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
                logger.exception("closing the Ray placement")
        for actor in [*self.engines, *self.trainers]:
            ray.kill(actor)
        from ray.util.placement_group import remove_placement_group

        for pg in self.placement_groups:
            remove_placement_group(pg)
        if self.started_ray:
            ray.shutdown()


__all__ = ["EngineServer", "RayPlacement", "RayPlacementError"]

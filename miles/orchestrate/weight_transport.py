"""Trainer -> engine servers: the three weight-sync transports, seen from the trainer ranks.

Every trainer rank calls :meth:`WeightSender.send` at the same time: the FSDP gather inside
:func:`miles.train.weight_export.iter_weight_buckets` is collective. Which rank talks to which
engine depends on the transport:

- ``distributed`` (disaggregated): rank 0 and the engines form one broadcast group
  (``/init_weights_update_group``, gloo on CPU, NCCL on GPU); per bucket rank 0 posts
  ``/update_weights_from_distributed`` (names, dtypes, shapes) to every engine and broadcasts
  the tensors in that order. Generation is paused around the update.
- ``disk``: rank 0 writes a Hugging Face directory (``config.json`` + safetensors, renamed into
  place atomically) and posts ``/update_weights_from_disk``; the directory must be visible to
  the engines (one node, or a shared filesystem).
- ``tensor`` (colocated): each rank hands its own engine(s) the tensors in place, through
  ``/update_weights_from_tensor`` with a ``torch.multiprocessing`` pickle (SGLang's
  ``MultiprocessingSerializer`` format, :func:`miles.engine.tensor_wire.encode_shared`): CUDA
  tensors travel as CUDA IPC handles, CPU tensors as shared-memory files. Nothing is copied
  through HTTP but the handles (the engine accepts them from callers on its own host only).

Every call to an engine sends the admin key (``admin_key``, by default ``$MILES_ADMIN_API_KEY``:
the Ray placement sets it for its trainer actors), has a timeout, and reads a bounded answer.
HTTP and the engines' API only; nothing here imports Ray.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

from miles.engine.client import ADMIN_KEY_ENV, EngineRequestError, http_call
from miles.engine.tensor_wire import encode_shared
from miles.engine.weight_sources import UpdateGroup, init_custom_process_group
from miles.orchestrate.engine_process import free_port
from miles.train.weight_export import iter_weight_buckets


class WeightSyncError(RuntimeError):
    """An engine refused or failed a weight update (its URL and answer are in the message)."""


_MAX_ANSWER_BYTES = 1024**2  # an engine's answer to a control call is a small JSON object


def _post(
    url: str, path: str, payload: dict[str, Any], timeout_s: float = 600.0, *, key: str | None = None
) -> dict[str, Any]:
    """POST ``payload`` to an engine's admin endpoint with the admin ``key``; its JSON answer."""
    try:
        r = http_call("POST", f"{url}{path}", payload, key=key, timeout_s=timeout_s,
                      max_response_bytes=_MAX_ANSWER_BYTES)  # fmt: skip
    except (httpx.HTTPError, EngineRequestError) as e:
        raise WeightSyncError(f"{url}{path}: {type(e).__name__}: {e}") from e
    if r.status != 200:
        raise WeightSyncError(f"{url}{path}: HTTP {r.status}: {r.text()}")
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _healthy(url: str) -> bool:
    try:
        return (
            http_call("GET", f"{url}/health", timeout_s=5.0, max_response_bytes=_MAX_ANSWER_BYTES).status
            == 200
        )
    except (httpx.HTTPError, EngineRequestError):
        return False


def _on_all(urls: Sequence[str], call: Callable[[str], Any]) -> list[Any]:
    """``call(url)`` for every engine at once (each may block in a collective with the others)."""
    if not urls:
        return []
    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(call, urls))


class WeightSender(abc.ABC):
    """One transport. ``send`` is called on every trainer rank with the same arguments.

    ``admin_key``: the engines' admin key (default: ``$MILES_ADMIN_API_KEY``, unset: none).
    ``pause_mode``: how generation is paused around an update (``/pause_generation``'s mode):
    ``abort`` when nothing may be in flight, ``in_place`` or ``retract`` for a partial rollout,
    whose requests in flight continue under the new weights (with ``retract`` the disk transport
    pauses too; otherwise it loads between two engine steps, which is ``in_place``)."""

    def __init__(
        self, rank: int, bucket_bytes: int, *, admin_key: str | None = None, pause_mode: str = "abort"
    ) -> None:
        self.rank = rank
        self.bucket_bytes = bucket_bytes
        self.admin_key = admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV) or None
        self.pause_mode = pause_mode

    @property
    def _pause(self) -> dict[str, Any]:
        return {"mode": self.pause_mode}

    def _post(self, url: str, path: str, payload: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
        return _post(url, path, payload, timeout_s, key=self.admin_key)

    @abc.abstractmethod
    def send(self, model: nn.Module, dtype: torch.dtype, version: int, engines: Sequence[str]) -> None:
        """Push ``model``'s weights as ``version`` to ``engines`` (collective over the ranks)."""

    def forget(self, url: str) -> None:
        """``url``'s server was restarted: drop whatever state referred to the old one."""
        return None  # stateless transports keep nothing per engine

    def close(self) -> None:
        """Release groups and files."""
        return None  # stateless transports hold nothing


class DistributedSender(WeightSender):
    """Broadcast from trainer rank 0 to the engines; the group is kept while the engine set is.
    ``group_timeout_s`` bounds the rendezvous (and each broadcast) of the group."""

    def __init__(
        self,
        rank: int,
        bucket_bytes: int,
        *,
        master_address: str,
        backend: str,
        group_timeout_s: float = 120.0,
        admin_key: str | None = None,
        pause_mode: str = "abort",
    ) -> None:
        super().__init__(rank, bucket_bytes, admin_key=admin_key, pause_mode=pause_mode)
        self.master_address = master_address
        self.backend = backend
        self.group_timeout_s = group_timeout_s
        self.group: UpdateGroup | None = None
        self.group_engines: tuple[str, ...] = ()
        self.group_name = ""
        self._count = 0

    def _ensure_group(self, engines: Sequence[str]) -> UpdateGroup:
        if self.group is not None and self.group_engines == tuple(engines):
            return self.group
        self._destroy()
        # Every engine must join or the rendezvous below waits out its timeout (and the live
        # engines' threads with it): refuse at once when one is down.
        down = [u for u in engines if not _healthy(u)]
        if down:
            raise WeightSyncError(f"engines {down} do not answer /health: no broadcast group with them")
        self._count += 1
        name = f"miles_weights_{os.getpid()}_{self._count}"
        port = free_port(self.master_address)
        world = len(engines) + 1

        def join(i_url: tuple[int, str]) -> Any:
            i, url = i_url
            payload = {"master_address": self.master_address, "master_port": port, "rank_offset": i + 1,
                       "world_size": world, "group_name": name, "backend": self.backend}  # fmt: skip
            # The engine answers once it joined (or gave up after its own rendezvous timeout).
            return self._post(url, "/init_weights_update_group", payload, timeout_s=self.group_timeout_s + 60)

        timeout = datetime.timedelta(seconds=self.group_timeout_s)
        with ThreadPoolExecutor(len(engines)) as pool:
            joined = pool.map(join, list(enumerate(engines)))
            group = init_custom_process_group(
                self.master_address, port, 0, world, name, self.backend, timeout=timeout
            )
            list(joined)  # re-raises an engine's refusal
        self.group, self.group_engines, self.group_name = group, tuple(engines), name
        return group

    def _destroy(self) -> None:
        if self.group is None:
            return
        for url in self.group_engines:
            with contextlib.suppress(WeightSyncError):  # a dead engine has nothing to destroy
                self._post(
                    url, "/destroy_weights_update_group", {"group_name": self.group_name}, timeout_s=10
                )
        if hasattr(self.group.backend, "shutdown"):
            self.group.backend.shutdown()
        self.group = None
        self.group_engines = ()

    def forget(self, url: str) -> None:
        if url in self.group_engines:
            self._destroy()

    def send(self, model: nn.Module, dtype: torch.dtype, version: int, engines: Sequence[str]) -> None:
        lead = self.rank == 0 and bool(engines)
        failure: BaseException | None = None
        group = None
        if lead:
            try:
                group = self._ensure_group(engines)
                _on_all(engines, lambda u: self._post(u, "/pause_generation", self._pause))
            except Exception as e:
                failure = e
        for bucket in iter_weight_buckets(model, dtype, self.bucket_bytes):
            # Every rank walks every bucket even after a failure: the gathers are collective.
            if not lead or failure is not None:
                continue
            assert group is not None
            payload = {
                "names": [n for n, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket],
                "group_name": self.group_name,
                "weight_version": str(version),
                "flush_cache": True,
            }
            try:
                with ThreadPoolExecutor(len(engines)) as pool:
                    answers = [
                        pool.submit(self._post, u, "/update_weights_from_distributed", payload)
                        for u in engines
                    ]
                    for _, t in bucket:
                        group.broadcast(t.to(group.device).contiguous(), 0)
                    for a in answers:
                        a.result()
            except Exception as e:
                failure = e
                self._destroy()  # a broadcast half done leaves the group unusable
        if lead:
            with contextlib.suppress(WeightSyncError):
                _on_all(engines, lambda u: self._post(u, "/continue_generation", {}))
        if failure is not None:
            raise WeightSyncError(f"weight update to {list(engines)} failed: {failure}") from failure

    def close(self) -> None:
        self._destroy()


class DiskSender(WeightSender):
    """Rank 0 writes an HF directory under ``directory`` and the engines load it."""

    def __init__(
        self,
        rank: int,
        bucket_bytes: int,
        *,
        directory: str | os.PathLike[str],
        admin_key: str | None = None,
        pause_mode: str = "abort",
    ) -> None:
        super().__init__(rank, bucket_bytes, admin_key=admin_key, pause_mode=pause_mode)
        self.directory = Path(directory)
        self.latest: Path | None = None

    def send(self, model: nn.Module, dtype: torch.dtype, version: int, engines: Sequence[str]) -> None:
        from safetensors.torch import save_file

        lead = self.rank == 0
        tmp: Path | None = None
        if lead:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".weights.", dir=self.directory))
            spec = getattr(model, "spec", None)
            config = dict(getattr(spec, "hf_config", {}))
            config.pop("_name_or_path", None)
            config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        failure: BaseException | None = None
        for i, bucket in enumerate(iter_weight_buckets(model, dtype, self.bucket_bytes)):
            if tmp is None or failure is not None:  # keep walking: the gathers are collective
                continue
            tensors = {n: t.detach().to("cpu").contiguous() for n, t in bucket}
            try:
                save_file(tensors, str(tmp / f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
            except OSError as e:
                failure = e
        if tmp is None:
            return
        if failure is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WeightSyncError(f"cannot write weights under {self.directory}: {failure}") from failure
        final = self.directory / f"version_{version}"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic: an engine never reads half a directory
        previous, self.latest = self.latest, final
        self.load_into(engines, version)
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)

    def load_into(self, engines: Sequence[str], version: int) -> None:
        """Point ``engines`` at the latest written directory (also used to re-sync a restarted one)."""
        if self.latest is None:
            raise WeightSyncError("no weights written yet")
        path = str(self.latest)
        payload = {"model_path": path, "weight_version": str(version), "flush_cache": True}
        if self.pause_mode != "retract":
            _on_all(engines, lambda u: self._post(u, "/update_weights_from_disk", payload))
            return
        _on_all(engines, lambda u: self._post(u, "/pause_generation", self._pause))
        try:
            _on_all(engines, lambda u: self._post(u, "/update_weights_from_disk", payload))
        finally:
            with contextlib.suppress(WeightSyncError):
                _on_all(engines, lambda u: self._post(u, "/continue_generation", {}))


class TensorSender(WeightSender):
    """Colocated: rank ``r`` sends the gathered buckets to the engines it shares a device with."""

    def __init__(
        self,
        rank: int,
        bucket_bytes: int,
        *,
        own_engines: Callable[[Sequence[str]], Sequence[str]],
        admin_key: str | None = None,
        pause_mode: str = "abort",
    ) -> None:
        super().__init__(rank, bucket_bytes, admin_key=admin_key, pause_mode=pause_mode)
        self.own_engines = own_engines

    def send(self, model: nn.Module, dtype: torch.dtype, version: int, engines: Sequence[str]) -> None:
        mine = list(self.own_engines(engines))
        failure: BaseException | None = None
        if mine:
            try:
                _on_all(mine, lambda u: self._post(u, "/pause_generation", self._pause))
            except Exception as e:
                failure = e
        for bucket in iter_weight_buckets(model, dtype, self.bucket_bytes):
            if not mine or failure is not None:  # keep walking: the gathers are collective
                continue
            named = [(n, t.detach().contiguous()) for n, t in bucket]
            payload: dict[str, Any] = {
                "serialized_named_tensors": [encode_shared(named)],
                "weight_version": str(version),
                "flush_cache": True,
            }
            try:
                _on_all(
                    mine, functools.partial(self._post, path="/update_weights_from_tensor", payload=payload)
                )
            except Exception as e:
                failure = e
            del named  # the engines copied them: the shared segments can go
        if mine:
            with contextlib.suppress(WeightSyncError):
                _on_all(mine, lambda u: self._post(u, "/continue_generation", {}))
        if failure is not None:
            raise WeightSyncError(f"weight update to {mine} failed: {failure}") from failure


__all__ = [
    "DiskSender",
    "DistributedSender",
    "TensorSender",
    "WeightSender",
    "WeightSyncError",
]

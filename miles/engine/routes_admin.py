"""The admin endpoints: weight updates and their broadcast groups, memory release and resume,
pause and continue, weight read-back (``server.ADMIN_PATHS``: the admin key, or loopback only).

Each body is a typed request (a frozen dataclass below) read by ``protocol.parse_request``: an
unknown field, a missing one or a value of the wrong type is a 400 naming the field, and each
class's ``__post_init__`` checks the ranges, all before the engine is touched. Engine refusals
(a tensor of the wrong shape, released memory, ...) answer 400 ``{"success": false, "message"}``
as SGLang does; the weights are then as they were.
"""

from __future__ import annotations

import asyncio
import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from miles.engine.engine import Engine, EngineStateError, PauseMode
from miles.engine.protocol import BadRequest, parse_request
from miles.engine.server import same_host, state_of
from miles.engine.tensor_wire import MAX_NAME_CHARS, WireError, decode_named_tensors
from miles.engine.weight_sources import UpdateGroup

router = APIRouter()

MAX_TENSORS = 100_000  # tensors in one update (more than any model has parameters)
_MAX_DIMS = 8
Version = str | int | None  # SGLang's weight_version: a decimal string (an integer is taken too)


# ---- request models ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PauseGeneration:
    """SGLang's three modes (``Engine.pause_generation`` says what each does to the requests);
    any other value is a 400 naming ``mode``."""

    mode: PauseMode = "abort"


@dataclass(frozen=True)
class ContinueGeneration:
    pass


@dataclass(frozen=True)
class UpdateWeightsFromDisk:
    model_path: str
    weight_version: Version = None
    flush_cache: bool = True
    load_format: Literal["auto"] | None = None  # the format is read from the files
    abort_all_requests: bool = False

    def __post_init__(self) -> None:
        if not self.model_path:
            raise BadRequest("model_path", "is required")


@dataclass(frozen=True)
class UpdateWeightsFromTensor:
    serialized_named_tensors: list[Any]
    weight_version: Version = None
    flush_cache: bool = True
    load_format: Literal["direct"] | None = None
    abort_all_requests: bool = False


@dataclass(frozen=True)
class InitWeightsUpdateGroup:
    """Checked (types and ranges) before anything connects anywhere."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: Literal["gloo", "nccl"] = "gloo"

    def __post_init__(self) -> None:
        addr = self.master_address
        if not 0 < len(addr) <= 253 or any(c.isspace() or c in "/\x00" for c in addr):
            raise BadRequest("master_address", f"must be a host name or IP address, got {addr!r:.80}")
        if not 1 <= self.master_port <= 65535:
            raise BadRequest("master_port", f"must be a port in [1, 65535], got {self.master_port}")
        world = self.world_size
        if not 2 <= world <= 65536:
            raise BadRequest(
                "world_size", f"must be in [2, 65536] (the trainer and the engines), got {world}"
            )
        if not 1 <= self.rank_offset < world:
            raise BadRequest(
                "rank_offset",
                f"must be in [1, world_size) = [1, {world}) (rank 0 is the trainer), got {self.rank_offset}",
            )
        if not 0 < len(self.group_name) <= 256:
            raise BadRequest("group_name", f"must have 1 to 256 characters, got {len(self.group_name)}")


@dataclass(frozen=True)
class UpdateWeightsFromDistributed:
    """One broadcast per tensor, described here; the descriptions are checked (see
    :func:`check_broadcast`) before the engine allocates anything to receive them."""

    names: list[Any]
    dtypes: list[Any]
    shapes: list[Any]
    group_name: str
    weight_version: Version = None
    flush_cache: bool = True
    load_format: str | None = None

    def __post_init__(self) -> None:
        if self.load_format is not None:
            raise BadRequest(
                "load_format", f"only null is supported (one broadcast per tensor), got {self.load_format!r}"
            )


@dataclass(frozen=True)
class DestroyWeightsUpdateGroup:
    group_name: str


@dataclass(frozen=True)
class MemoryTags:
    """``/release_memory_occupation`` and ``/resume_memory_occupation`` (null: every tag)."""

    tags: list[str] | None = None


@dataclass(frozen=True)
class GetWeightsByName:
    name: str
    truncate_size: int = 100

    def __post_init__(self) -> None:
        if not self.name:
            raise BadRequest("name", "is required")
        if self.truncate_size < 1:
            raise BadRequest("truncate_size", f"must be >= 1, got {self.truncate_size}")


# ---- pause and memory ----------------------------------------------------------------------------


@router.post("/pause_generation")
async def pause_generation(request: Request) -> Response:
    s = state_of(request)
    req = parse_request(PauseGeneration, await s.body(request))
    return await s.control(lambda e: e.pause_generation(req.mode))


@router.post("/continue_generation")
async def continue_generation(request: Request) -> Response:
    s = state_of(request)
    parse_request(ContinueGeneration, await s.body(request))
    return await s.control(lambda e: e.continue_generation())


@router.post("/release_memory_occupation")
async def release_memory_occupation(request: Request) -> Response:
    s = state_of(request)
    req = parse_request(MemoryTags, await s.body(request))
    return await s.control(lambda e: e.release_memory_occupation(req.tags))


@router.post("/resume_memory_occupation")
async def resume_memory_occupation(request: Request) -> Response:
    s = state_of(request)
    req = parse_request(MemoryTags, await s.body(request))
    return await s.control(lambda e: e.resume_memory_occupation(req.tags))


# ---- weights ---------------------------------------------------------------------------------------


def _update(abort_all: bool, fn: Callable[[Engine], None]) -> Callable[[Engine], dict[str, Any]]:
    """A weight update on the engine thread (every request aborted first with
    ``abort_all_requests``), answering the version it set."""

    def run(e: Engine) -> dict[str, Any]:
        if abort_all:
            e.abort()
        fn(e)
        return {"weight_version": e.weight_version}

    return run


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(request: Request) -> Response:
    s = state_of(request)
    req = parse_request(UpdateWeightsFromDisk, await s.body(request))
    update = _update(
        req.abort_all_requests,
        lambda e: e.update_weights_from_disk(req.model_path, req.weight_version, req.flush_cache),
    )
    return await s.control(update)


@router.post("/update_weights_from_tensor")
async def update_weights_from_tensor(request: Request) -> Response:
    s = state_of(request)
    req = parse_request(UpdateWeightsFromTensor, await s.body(request))
    try:  # shared-memory / CUDA-IPC handles only mean something to a caller on this host
        named = await asyncio.to_thread(
            decode_named_tensors,
            req.serialized_named_tensors,
            allow_shared=same_host(request.scope),
            max_bytes=s.config.max_weight_update_bytes,
            max_tensors=MAX_TENSORS,
        )
    except WireError as e:
        raise BadRequest("serialized_named_tensors", str(e)) from None
    update = _update(
        req.abort_all_requests,
        lambda e: e.update_weights_from_tensors(named, req.weight_version, req.flush_cache),
    )
    return await s.control(update)


@router.post("/init_weights_update_group")
async def init_weights_update_group(request: Request) -> Response:
    """The rendezvous runs on a worker thread, bounded by ``weight_update_group_timeout_s``:
    generation goes on meanwhile, and an unreachable trainer costs a 400, not a frozen engine."""
    s = state_of(request)
    req = parse_request(InitWeightsUpdateGroup, await s.body(request))
    device = s.core.model.device
    if req.backend == "nccl" and device.type != "cuda":
        raise BadRequest("backend", "'nccl' needs an engine on a CUDA device; use 'gloo'")
    if await s.engine.call(lambda e: e.has_weights_update_group(req.group_name)):
        raise BadRequest("group_name", f"weights update group {req.group_name!r} already exists")
    timeout_s = s.config.weight_update_group_timeout_s
    try:
        group = await asyncio.to_thread(join_update_group, req, timeout_s, device)
    except Exception as e:  # torch's DistStoreError/DistNetworkError, a refused connection, ...
        where = f"{req.master_address}:{req.master_port}"
        message = f"cannot join weights update group {req.group_name!r} at {where} within {timeout_s:g} s: {type(e).__name__}: {e}"
        return JSONResponse({"success": False, "message": message}, status_code=400)
    return await s.control(lambda e: e.add_weights_update_group(req.group_name, group))


@router.post("/update_weights_from_distributed")
async def update_weights_from_distributed(request: Request) -> Response:
    s = state_of(request)
    req = parse_request(UpdateWeightsFromDistributed, await s.body(request))
    check_broadcast(req.names, req.dtypes, req.shapes, s.config.max_weight_update_bytes)
    update = _update(
        False,
        lambda e: e.update_weights_from_distributed(
            req.names, req.dtypes, req.shapes, req.group_name, req.weight_version, req.flush_cache
        ),
    )
    return await s.control(update)


@router.post("/destroy_weights_update_group")
async def destroy_weights_update_group(request: Request) -> Response:
    s = state_of(request)
    req = parse_request(DestroyWeightsUpdateGroup, await s.body(request))
    return await s.control(lambda e: e.destroy_weights_update_group(req.group_name))


@router.api_route("/get_weights_by_name", methods=["GET", "POST"])
async def get_weights_by_name(request: Request) -> Response:
    """SGLang's weight read-back: the first ``truncate_size`` rows of parameter ``name`` as
    (nested) float lists. Trainers use it to check a weight sync."""
    s = state_of(request)
    req = parse_request(GetWeightsByName, await s.body(request))
    try:
        values = await s.engine.call(lambda e: e.get_weights_by_name(req.name, req.truncate_size))
    except (ValueError, EngineStateError) as e:
        return JSONResponse({"success": False, "message": str(e)}, status_code=400)
    return JSONResponse(values)


def join_update_group(req: InitWeightsUpdateGroup, timeout_s: float, device: Any) -> UpdateGroup:
    """The rendezvous of ``req`` (blocking: call it on a worker thread), bounded by ``timeout_s``."""
    import torch

    from miles.engine.weight_sources import init_custom_process_group

    if req.backend == "nccl":
        torch.cuda.set_device(device)  # this worker thread's current device is the engine's
    timeout = datetime.timedelta(seconds=timeout_s)
    return init_custom_process_group(
        req.master_address, req.master_port, req.rank_offset, req.world_size, req.group_name,
        req.backend, timeout=timeout,
    )  # fmt: skip


def check_broadcast(names: list[Any], dtypes: list[Any], shapes: list[Any], max_bytes: int) -> None:
    """``/update_weights_from_distributed``'s tensor list: names, known dtypes, shapes of
    non-negative ints, at most ``max_bytes`` in all (the engine allocates them to receive)."""
    import torch

    from miles.engine.weight_load import parse_dtype

    if not len(names) == len(dtypes) == len(shapes):
        raise BadRequest(
            "names", f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})"
        )
    if len(names) > MAX_TENSORS:
        raise BadRequest("names", f"{len(names)} tensors in one update: at most {MAX_TENSORS}")
    total = 0
    for i, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise BadRequest("names", f"entry {i} must be a name of 1 to {MAX_NAME_CHARS} characters")
        try:
            size = torch.empty((), dtype=parse_dtype(dtype)).element_size() if isinstance(dtype, str) else 0
        except (ValueError, TypeError, RuntimeError):  # not a dtype, or one torch cannot allocate
            size = 0
        if not size:
            raise BadRequest("dtypes", f"entry {i} is not a torch dtype name: {dtype!r:.40}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise BadRequest("shapes", f"entry {i} must be a list of at most {_MAX_DIMS} sizes >= 0")
        total += math.prod(shape) * size
        if total > max_bytes:
            raise BadRequest("shapes", f"the tensors exceed {max_bytes} bytes (--max-weight-update-bytes)")

"""Weight updates for a live engine: validation, atomic apply, buckets, broadcast groups, offload.

Every update is all-or-nothing. Tensors are first checked against the model's parameters (HF
names as in ``model.state_dict()``; ``lm_head.weight`` of a tied model is accepted and updates
the shared embedding), shapes, and dtypes (any floating dtype, cast to the parameter's); one bad
tensor raises ``WeightUpdateError`` naming it before any parameter changes. A partial update (a
subset of the parameters) is allowed, as in SGLang.

Bucketed updates stage each bucket into a copy on the parameter's device, so the caller may reuse
its buffers after each call and ``commit`` copies everything at once.

Broadcast groups follow SGLang's ``init_custom_process_group``: a ``TCPStore`` at
``master_address:master_port`` (served by rank 0, the trainer), wrapped in a
``PrefixStore(group_name)``, and a ``ProcessGroupGloo``/``ProcessGroupNCCL`` constructed on it
directly: no default process group is needed in the engine process.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from miles.models.transformer import CausalLM

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class WeightUpdateError(ValueError):
    """A weight update was refused; the engine keeps the weights it had."""


def flatten_named_tensors(named_tensors: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor), ...]`` from pairs or from a sequence of buckets of pairs."""
    out: list[tuple[str, torch.Tensor]] = []
    for item in named_tensors:
        if isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0], item[1]))
        elif isinstance(item, Iterable) and not isinstance(item, (str, bytes, torch.Tensor)):
            out += flatten_named_tensors(item)
        else:
            raise WeightUpdateError(
                f"expected (name, tensor) pairs or buckets of them, got {type(item).__name__}"
            )
    return out


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``/``"torch.bfloat16"``/a dtype -> ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise WeightUpdateError(f"unknown dtype {name!r}")
    return dtype


@dataclass
class _Session:
    staged: dict[str, torch.Tensor] = field(default_factory=dict)
    failed: str | None = None  # first error of a bucket: commit is refused after it


class WeightUpdater:
    """Validates and applies HF-named tensors to one model's parameters."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self._session: _Session | None = None

    # ---- validation and apply ----------------------------------------------------------------

    def _params(self) -> dict[str, torch.nn.Parameter]:
        # Built once per update, not per tensor: walking the module tree for each of an MoE's
        # thousands of expert tensors made an update quadratic (3.4 s for 1,611 small tensors).
        return dict(self.model.named_parameters())

    def target(self, name: str, tensor: Any, params: dict[str, torch.nn.Parameter] | None = None) -> str:
        """The parameter ``name`` updates; raise ``WeightUpdateError`` naming the tensor if invalid."""
        params = self._params() if params is None else params
        key = name
        if self.model.spec.tie_word_embeddings and name == "lm_head.weight":
            key = "model.embed_tokens.weight"
        if key not in params:
            raise WeightUpdateError(f"tensor {name!r}: no such parameter in the model")
        if not isinstance(tensor, torch.Tensor):
            raise WeightUpdateError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        p = params[key]
        if tuple(tensor.shape) != tuple(p.shape):
            raise WeightUpdateError(
                f"tensor {name!r}: shape {tuple(tensor.shape)}, the parameter has {tuple(p.shape)}"
            )
        if not tensor.dtype.is_floating_point:
            raise WeightUpdateError(
                f"tensor {name!r}: dtype {tensor.dtype} is not floating point (the parameter is {p.dtype})"
            )
        return key

    def validate(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """``[(parameter name, tensor)]`` after checking every tensor; raises on the first bad one."""
        params = self._params()
        return [(self.target(name, t, params), t) for name, t in named_tensors]

    @torch.no_grad()
    def apply(self, named_tensors: Iterable[Any]) -> int:
        """Validate all, then copy all (cast to each parameter's dtype). Returns the count."""
        checked = self.validate(flatten_named_tensors(named_tensors))
        params = dict(self.model.named_parameters())
        for key, t in checked:
            params[key].copy_(t)
        return len(checked)

    # ---- bucketed sessions -------------------------------------------------------------------

    @property
    def in_session(self) -> bool:
        return self._session is not None

    def begin(self) -> None:
        if self._session is not None:
            raise WeightUpdateError("a weight update is already in progress: commit or abort it first")
        self._session = _Session()

    @torch.no_grad()
    def stage(self, named_tensors: Iterable[Any]) -> int:
        """Validate one bucket and stage a copy of it. A bad bucket stages nothing and makes the
        session refuse to commit (a partial sync is never applied by mistake)."""
        session = self._need_session()
        try:
            checked = self.validate(flatten_named_tensors(named_tensors))
        except WeightUpdateError as e:
            session.failed = session.failed or str(e)
            raise
        params = dict(self.model.named_parameters())
        for key, t in checked:
            p = params[key]
            # A copy: the caller may refill its bucket buffer right after this call.
            session.staged[key] = t.detach().to(device=p.device, dtype=p.dtype, copy=True)
        return len(checked)

    @torch.no_grad()
    def commit(self) -> int:
        """Copy every staged tensor into the model; returns how many parameters changed."""
        session = self._need_session()
        if session.failed is not None:
            raise WeightUpdateError(
                f"a bucket of this weight update failed ({session.failed}); call abort_weight_update()"
            )
        params = dict(self.model.named_parameters())
        for key, t in session.staged.items():
            params[key].copy_(t)
        self._session = None
        return len(session.staged)

    def abort(self) -> None:
        """Drop the staged tensors (no-op without a session)."""
        self._session = None

    def _need_session(self) -> _Session:
        if self._session is None:
            raise WeightUpdateError("no weight update in progress: call begin_weight_update() first")
        return self._session


def read_checkpoint_tensors(model: CausalLM, model_path: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of an HF directory (or GGUF) for ``model``; the checkpoint must be complete."""
    from miles.models.loading import CheckpointError, _iter_safetensors, resolve_checkpoint

    try:
        src = resolve_checkpoint(model_path)
        if src.kind == "gguf":
            from miles.models.gguf_reader import iter_gguf_tensors

            tensors = list(iter_gguf_tensors(src.path, dict(model.spec.hf_config)))
        else:
            tensors = list(_iter_safetensors(src.path))
    except (CheckpointError, OSError) as e:
        raise WeightUpdateError(f"cannot read weights from {model_path}: {e}") from e
    names = {n for n, _ in tensors}
    tied = model.spec.tie_word_embeddings
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(n for n in expected - names if not (tied and n == "lm_head.weight"))
    if missing:
        raise WeightUpdateError(f"{model_path}: missing tensors ({len(missing)}): {', '.join(missing[:8])}")
    # A buffer older exporters saved, not a parameter: skipped as load_model does.
    return [(n, t) for n, t in tensors if not n.endswith("rotary_emb.inv_freq")]


# ---- broadcast groups ------------------------------------------------------------------------


@dataclass
class UpdateGroup:
    """A trainer<->engine broadcast group: the backend (``ProcessGroupGloo``/``ProcessGroupNCCL``),
    the store it rendezvoused through (kept alive with it), and where its tensors live."""

    backend: Any
    store: dist.TCPStore
    device: torch.device
    rank: int
    world_size: int

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.backend.broadcast(tensor, src).wait()


def init_custom_process_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    timeout: datetime.timedelta = datetime.timedelta(minutes=10),
) -> UpdateGroup:
    """A process group outside the default one (the trainer side calls this with ``rank=0``).

    Rank 0 serves the ``TCPStore``; the store is prefixed by ``group_name`` so several groups can
    share one address. Works without ``init_process_group`` in this process.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of size {world_size}")
    store = dist.TCPStore(
        master_address,
        int(master_port),
        world_size,
        is_master=rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    prefixed = dist.PrefixStore(group_name, store)
    backend_obj: Any
    if backend == "gloo":
        backend_obj = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        device = torch.device("cpu")
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        backend_obj = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
        device = torch.device("cuda", torch.cuda.current_device())
    return UpdateGroup(backend_obj, store, device, rank, world_size)


def broadcast_receive(
    group: UpdateGroup, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]]
) -> list[tuple[str, torch.Tensor]]:
    """Receive one broadcast (from rank 0) per tensor, in order, into fresh buffers."""
    if not len(names) == len(dtypes) == len(shapes):
        raise WeightUpdateError(
            f"names, dtypes and shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}"
        )
    parsed = [parse_dtype(d) for d in dtypes]
    out = []
    for name, dtype, shape in zip(names, parsed, shapes):
        buf = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=group.device)
        group.broadcast(buf, 0)
        out.append((name, buf))
    return out


# ---- memory offload --------------------------------------------------------------------------


def offload_parameters(model: CausalLM) -> dict[str, torch.Tensor]:
    """Move every parameter's data out of the model; the parameters keep dtype and device.

    On CUDA the data go to pinned CPU memory and the device memory is freed. On CPU there is
    nowhere cheaper to put them, so the original storage itself is kept aside (nothing is freed,
    but the contract, "no usable weights until resume", is the same).
    """
    saved: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # tied parameters appear once
        if p.device.type == "cuda":
            host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=True)
            host.copy_(p.data, non_blocking=True)
            saved[name] = host
        else:
            saved[name] = p.data
    if any(t.is_pinned() for t in saved.values()):
        torch.cuda.synchronize()
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return saved


def restore_parameters(model: CausalLM, saved: dict[str, torch.Tensor]) -> None:
    """Inverse of ``offload_parameters`` (bitwise: the same values come back)."""
    for name, p in model.named_parameters():
        p.data = saved[name].to(p.device, non_blocking=True)
    if any(p.device.type == "cuda" for p in model.parameters()):
        torch.cuda.synchronize()

"""Weight updates for a live engine: validation, atomic apply, buckets, broadcast groups, offload.

Every update is all-or-nothing. Tensors are first checked against the model's parameters (HF
names as in ``model.state_dict()``; ``lm_head.weight`` of a tied model is accepted and updates
the shared embedding), shapes, dtypes (any floating dtype, cast to the parameter's) and values
(every value finite in the parameter's dtype: a NaN or an infinity, or a value the cast would
overflow, makes every later log-probability NaN); one bad tensor raises ``WeightUpdateError``
naming it before any parameter changes. A partial update (a subset of the parameters) is
allowed, as in SGLang.

What comes from outside is bounded before anything is allocated for it: a checkpoint's
safetensors headers (names, shapes, dtypes) are checked against the model before any tensor is
read, and a broadcast's names, dtypes and shapes before any receive buffer exists, so an update
never allocates more than the parameters it may set. Unreadable files (truncated, bad headers,
GGUF garbage) raise ``WeightUpdateError`` naming the file.

Bucketed updates stage each bucket into a copy on the parameter's device, so the caller may reuse
its buffers after each call and ``commit`` copies everything at once.

Broadcast groups follow SGLang's ``init_custom_process_group``: a ``TCPStore`` at
``master_address:master_port`` (served by rank 0, the trainer), wrapped in a
``PrefixStore(group_name)``, and a ``ProcessGroupGloo``/``ProcessGroupNCCL`` constructed on it
directly: no default process group is needed in the engine process.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from miles.models.transformer import CausalLM

NamedTensors = Iterable[tuple[str, torch.Tensor]]

# safetensors header dtype codes of floating tensors (any of them casts to the parameter's).
_SAFETENSORS_FLOAT = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class WeightUpdateError(ValueError):
    """A weight update was refused; the engine keeps the weights it had."""


def flatten_named_tensors(named_tensors: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor), ...]`` from pairs or from a sequence of buckets of pairs (no deeper:
    the nesting comes from the caller, and a recursion over it could be driven arbitrarily deep)."""
    out: list[tuple[str, torch.Tensor]] = []
    for item in named_tensors:
        if _is_pair(item):
            out.append((item[0], item[1]))
        elif isinstance(item, Iterable) and not isinstance(item, (str, bytes, torch.Tensor, dict)):
            for pair in item:
                if not _is_pair(pair):
                    raise WeightUpdateError(
                        f"a bucket must hold (name, tensor) pairs, got {type(pair).__name__}"
                    )
                out.append((pair[0], pair[1]))
        else:
            raise WeightUpdateError(
                f"expected (name, tensor) pairs or buckets of them, got {type(item).__name__}"
            )
    return out


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, Sequence)
        and not isinstance(item, str)
        and len(item) == 2
        and isinstance(item[0], str)
    )


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``/``"torch.bfloat16"``/a dtype -> ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    if not isinstance(name, str):
        raise WeightUpdateError(f"a dtype must be a string such as 'bfloat16', got {name!r:.40}")
    # The module's own attributes only: getattr(torch, ...) would import lazy submodules.
    dtype = vars(torch).get(name.removeprefix("torch."))
    if not isinstance(dtype, torch.dtype):
        raise WeightUpdateError(f"unknown dtype {name!r:.40}")
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

    def check_meta(
        self, name: str, shape: Sequence[int], dtype: torch.dtype, params: dict[str, torch.nn.Parameter]
    ) -> str:
        """The parameter a tensor ``name`` of ``shape`` and ``dtype`` would update (its key in
        ``params``); raise ``WeightUpdateError`` naming the tensor if it cannot."""
        key = name
        if self.model.spec.tie_word_embeddings and name == "lm_head.weight":
            key = "model.embed_tokens.weight"
        if key not in params:
            raise WeightUpdateError(f"tensor {name!r:.120}: no such parameter in the model")
        p = params[key]
        if tuple(shape) != tuple(p.shape):
            raise WeightUpdateError(
                f"tensor {name!r}: shape {tuple(shape)}, the parameter has {tuple(p.shape)}"
            )
        if not dtype.is_floating_point:
            raise WeightUpdateError(
                f"tensor {name!r}: dtype {dtype} is not floating point (the parameter is {p.dtype})"
            )
        return key

    def target(self, name: str, tensor: Any, params: dict[str, torch.nn.Parameter] | None = None) -> str:
        """The parameter ``name`` updates; raise ``WeightUpdateError`` naming the tensor if invalid
        (its values are checked by :meth:`validate`)."""
        params = self._params() if params is None else params
        if not isinstance(tensor, torch.Tensor):
            raise WeightUpdateError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided or tensor.is_meta:
            # copy_ from these fails (or copies nothing) half-way through an update.
            raise WeightUpdateError(
                f"tensor {name!r}: a dense tensor with data is needed, got {tensor.layout} on {tensor.device}"
            )
        return self.check_meta(name, tensor.shape, tensor.dtype, params)

    def validate(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """``[(parameter name, tensor)]`` after checking every tensor (name, shape, dtype, then
        finite values in the parameter's dtype); raises on the first bad one."""
        params = self._params()
        checked = [(self.target(name, t, params), t) for name, t in named_tensors]
        check_finite([(name, t, params[key].dtype) for (name, t), (key, _) in zip(named_tensors, checked)])
        return checked

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

    def mark_failed(self, reason: str) -> None:
        """Make the session (if any) refuse to commit: a bucket was refused before :meth:`stage`."""
        if self._session is not None:
            self._session.failed = self._session.failed or reason

    def abort(self) -> None:
        """Drop the staged tensors (no-op without a session)."""
        self._session = None

    def _need_session(self) -> _Session:
        if self._session is None:
            raise WeightUpdateError("no weight update in progress: call begin_weight_update() first")
        return self._session


@torch.no_grad()
def check_finite(tensors: Sequence[tuple[str, torch.Tensor, torch.dtype]]) -> None:
    """Raise ``WeightUpdateError`` naming the first tensor with a NaN, an infinity or a value
    outside the range of its target dtype (the cast would make it infinite).

    One reduction per tensor, queued on its device, and one host read per device for the whole
    update (a read per tensor would wait on the device thousands of times for an MoE); the
    tensors are walked one by one only to name the culprit of a refused update."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, t, dtype in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append(_in_range(t, dtype))
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return
    for name, t, dtype in tensors:
        if t.numel() and not bool(_in_range(t, dtype)):
            raise WeightUpdateError(
                f"tensor {name!r}: holds NaN or infinite values (or values beyond the range of {dtype}): refused"
            )


def _in_range(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0-dim bool on ``t``'s device: every value of ``t`` finite and within ``dtype``'s range
    (NaN fails both comparisons). Compared in fp64: a bound rounded to a narrower dtype can be
    infinite itself."""
    if t.element_size() == 1:  # fp8 has no aminmax; float16 holds every fp8 value, inf and NaN
        t = t.to(torch.float16)
    lo, hi = torch.aminmax(t)
    bound = torch.finfo(dtype).max
    return (lo.double() >= -bound) & (hi.double() <= bound)


def read_checkpoint_tensors(model: CausalLM, model_path: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of an HF directory (or GGUF) for ``model``; the checkpoint must be complete.

    Safetensors headers are checked against the model (names, shapes, floating dtypes) before any
    tensor is read, so a checkpoint of another model never loads. Anything unreadable (a missing
    ``config.json``, a truncated file, a bad header or index, GGUF garbage) raises
    ``WeightUpdateError`` naming the path; values are checked by the update itself.
    """
    from miles.models.loading import resolve_checkpoint

    try:
        src = resolve_checkpoint(model_path)
    except (ValueError, OSError) as e:
        raise WeightUpdateError(f"cannot read weights from {model_path}: {e}") from e
    if src.kind == "gguf":
        try:
            from miles.models.gguf_reader import iter_gguf_tensors

            tensors = list(iter_gguf_tensors(src.path, dict(model.spec.hf_config)))
        except MemoryError:
            raise
        except Exception as e:  # the reader's errors on garbage are many and untyped
            raise WeightUpdateError(f"cannot read weights from {src.path}: {type(e).__name__}: {e}") from e
    else:
        tensors = _read_safetensors(model, src.path)
    names = {n for n, _ in tensors}
    tied = model.spec.tie_word_embeddings
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(n for n in expected - names if not (tied and n == "lm_head.weight"))
    if missing:
        raise WeightUpdateError(f"{model_path}: missing tensors ({len(missing)}): {', '.join(missing[:8])}")
    return [(n, t) for n, t in tensors if not _skipped(n)]


def _skipped(name: str) -> bool:
    # A buffer older exporters saved, not a parameter: skipped as load_model does.
    return name.endswith("rotary_emb.inv_freq")


def _safetensors_files(path: Path) -> list[Path]:
    """The shards of an HF directory: those its index names (plain file names in ``path``), or
    every ``*.safetensors`` without an index."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightUpdateError(f"cannot read weights from {path}: no *.safetensors files")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise WeightUpdateError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise WeightUpdateError(f"{index}: weight_map must map tensor names to file names")
    out = []
    for f in sorted(set(weight_map.values())):
        shard = path / f
        if Path(f).name != f or f in ("", ".", "..") or not shard.is_file():
            raise WeightUpdateError(f"{index} lists {f!r}, which is not a file in {path}")
        out.append(shard)
    return out


def _read_safetensors(model: CausalLM, path: Path) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the directory's shards, after checking each header against ``model``."""
    from safetensors import SafetensorError, safe_open

    updater = WeightUpdater(model)
    params = updater._params()
    files = _safetensors_files(path)
    current = files[0]
    try:
        seen: dict[str, Path] = {}
        for current in files:  # headers only: nothing is read yet
            with safe_open(str(current), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if name in seen:
                        raise WeightUpdateError(f"{current}: tensor {name!r} is also in {seen[name].name}")
                    seen[name] = current
                    if not _skipped(name):
                        _check_header(updater, params, current, name, handle.get_slice(name))
        tensors = []
        for current in files:
            with safe_open(str(current), framework="pt") as handle:
                names = [n for n in handle.keys() if not _skipped(n)]  # noqa: SIM118
                tensors += [(name, handle.get_tensor(name)) for name in names]
    except (SafetensorError, OSError) as e:
        raise WeightUpdateError(f"cannot read weights from {current}: {e}") from e
    return tensors


def _check_header(
    updater: WeightUpdater, params: dict[str, torch.nn.Parameter], file: Path, name: str, meta: Any
) -> None:
    dtype = meta.get_dtype()
    if dtype not in _SAFETENSORS_FLOAT:
        raise WeightUpdateError(f"{file}: tensor {name!r} has dtype {dtype}, not a floating type")
    try:
        updater.check_meta(name, meta.get_shape(), torch.float32, params)
    except WeightUpdateError as e:
        raise WeightUpdateError(f"{file}: {e}") from None


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
    group: UpdateGroup,
    names: Sequence[str],
    dtypes: Sequence[str],
    shapes: Sequence[Sequence[int]],
    updater: WeightUpdater,
) -> list[tuple[str, torch.Tensor]]:
    """Receive one broadcast (from rank 0) per tensor, in order, into fresh buffers.

    The names, dtypes and shapes come from the network: all of them are checked against the
    model's parameters (each name once, its shape that of the parameter, a floating dtype) before
    the first buffer is allocated, so an update allocates at most one buffer per parameter of the
    parameter's size. A refused update receives nothing (the sender's broadcast then fails by its
    group's timeout)."""
    for what, seq in (("names", names), ("dtypes", dtypes), ("shapes", shapes)):
        if not isinstance(seq, Sequence) or isinstance(seq, str):
            raise WeightUpdateError(f"{what} must be a list, got {type(seq).__name__}")
    if not len(names) == len(dtypes) == len(shapes):
        raise WeightUpdateError(
            f"names, dtypes and shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}"
        )
    params = updater._params()
    if len(names) > len(params) + 1:  # + 1: a tied model's lm_head.weight
        raise WeightUpdateError(f"{len(names)} tensors for a model of {len(params)} parameters")
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    seen: set[str] = set()
    for name, dtype_name, shape in zip(names, dtypes, shapes):
        if not isinstance(name, str):
            raise WeightUpdateError(f"tensor names must be strings, got {name!r:.40}")
        if name in seen:
            raise WeightUpdateError(f"tensor {name!r} is named twice in one update")
        seen.add(name)
        dims = _shape(name, shape)
        dtype = parse_dtype(dtype_name)
        updater.check_meta(name, dims, dtype, params)
        plan.append((name, dtype, dims))
    out = []
    for name, dtype, dims in plan:
        buf = torch.empty(dims, dtype=dtype, device=group.device)
        group.broadcast(buf, 0)
        out.append((name, buf))
    return out


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if (
        not isinstance(shape, Sequence)
        or isinstance(shape, str)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise WeightUpdateError(
            f"tensor {name!r:.120}: shape must be a list of integers >= 0, got {shape!r:.40}"
        )
    return tuple(shape)


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

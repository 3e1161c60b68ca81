"""How a live engine takes new weights: validation, an atomic apply, staged buckets, versions.

Every update is all-or-nothing. Tensors are first checked against the model's parameters (HF
names as in ``model.state_dict()``; ``lm_head.weight`` of a tied model is accepted and updates
the shared embedding), shapes, dtypes (any floating dtype, cast to the parameter's) and values
(every value finite in the parameter's dtype: a NaN or an infinity, or a value the cast would
overflow, makes every later log-probability NaN); one bad tensor raises ``WeightUpdateError``
naming it before any parameter changes. A partial update (a subset of the parameters) is
allowed, as in SGLang. The new ``weight_version`` is checked (:func:`parse_weight_version`)
before anything changes too.

Bucketed updates stage each bucket into a copy on the parameter's device, so the caller may reuse
its buffers after each call and ``commit`` copies everything at once.

Where the tensors come from (a checkpoint on disk, a broadcast from the trainer) is
``miles.engine.weight_sources``; the ``Engine`` methods that run an update (SGLang's
``update_weights_from_*``) are in ``miles.engine.engine``. The release of the weights' memory
and its resume (:func:`offload_parameters`, :func:`restore_parameters`) move the same parameters
out of the device and back, bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from miles.models.transformer import CausalLM
from miles.types import WeightVersion

NamedTensors = Iterable[tuple[str, torch.Tensor]]

# SGLang's weight_version is a string; Miles' is the decimal step count (types.WeightVersion),
# bounded to 63 bits so every consumer can hold it in an int64.
_VERSION_RE = re.compile(r"[0-9]{1,19}")
_MAX_VERSION = 2**63 - 1


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


def parse_weight_version(weight_version: str | int | None, current: WeightVersion) -> WeightVersion:
    """The version an update will set, checked before anything changes: ``None`` (``current``
    plus one), or a decimal string or integer in ``[0, 2**63)``."""
    if weight_version is None:
        return current.next()
    if isinstance(weight_version, int) and not isinstance(weight_version, bool):
        step = weight_version
    elif isinstance(weight_version, str) and _VERSION_RE.fullmatch(weight_version):
        step = int(weight_version)
    else:
        step = -1
    if not 0 <= step <= _MAX_VERSION:
        raise WeightUpdateError(
            f"weight_version must be a decimal integer in [0, 2**63), got {weight_version!r}: "
            "nothing was updated"
        )
    return WeightVersion(step)


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
        # thousands of expert tensors made an update quadratic in the number of tensors.
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


# ---- the weights out of device memory and back (release/resume_memory_occupation) ----------


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

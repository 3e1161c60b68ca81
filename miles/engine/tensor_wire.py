"""Named tensors on the wire of ``/update_weights_from_tensor``, decoded without trusting the sender.

One entry of ``serialized_named_tensors`` is base64 text of one of two encodings:

- **safetensors** (:func:`encode_safetensors`): the bytes of a safetensors file. Pickle-free
  and self-describing: any authorised caller, from any host, may send it.
- **shared** (:func:`encode_shared`): SGLang's ``MultiprocessingSerializer`` format, a
  ``torch.multiprocessing`` pickle of ``[(name, tensor), ...]`` whose tensors travel as CUDA-IPC
  handles or shared-memory file names (a colocated trainer hands its buckets over without a
  copy). The handles only mean something on the sender's host, so the server accepts this
  encoding from loopback callers only (``allow_shared``), and the pickle is never given to
  ``pickle.loads``: its opcodes are checked against a list that cannot build arbitrary objects
  (no ``BUILD``/``OBJ``/``INST``/``NEWOBJ``/persistent ids), and :class:`_TensorUnpickler` resolves
  only the handful of globals a tensor needs, each to a wrapper that type-checks its arguments
  (and, for shared memory, that the file exists under ``/dev/shm`` and is as large as claimed)
  before calling torch's own rebuild function.

Every decode is bounded (bytes, tensor count, name length, dimensions) and raises
:class:`WireError` naming the problem; nothing is applied here (the engine validates names,
shapes, dtypes and values against its model before any weight changes).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import pickle
import pickletools
import re
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "MAX_NAME_CHARS",
    "WireError",
    "decode_named_tensors",
    "encode_safetensors",
    "encode_shared",
]

MAX_NAME_CHARS = 1024
_MAX_DIMS = 8
_SHM_DIR = "/dev/shm"
_SHM_HANDLE = re.compile(rb"/torch_[0-9A-Za-z_]{1,128}")
_MANAGER_SOCKET = re.compile(rb"/[^\x00]{1,4096}")
_IPC_HANDLE_MAX_BYTES = 4096

# Opcodes of a torch.multiprocessing pickle of [(name, tensor)]: containers, scalars, strings,
# bytes, memo, globals and calls. Everything that builds or mutates arbitrary objects is absent.
_ALLOWED_OPCODES = frozenset(
    {
        "PROTO", "FRAME", "STOP", "MARK", "EMPTY_LIST", "APPEND", "APPENDS", "EMPTY_TUPLE",
        "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "BININT", "BININT1", "BININT2", "LONG1", "NONE",
        "NEWTRUE", "NEWFALSE", "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
        "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "GLOBAL", "STACK_GLOBAL", "REDUCE", "MEMOIZE",
        "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
    }
)  # fmt: skip
_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "int64", "int32", "int16", "int8", "uint8", "bool",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}  # fmt: skip


class WireError(ValueError):
    """``serialized_named_tensors`` could not be decoded; the message says why."""


# ---- encoding (the trainer side) -------------------------------------------------------------


def encode_safetensors(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """Base64 of a safetensors file holding ``named`` (copied to the CPU; names must be unique)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in named:
        if name in tensors:
            raise WireError(f"tensor name {name!r} given twice")
        host = t.detach().to("cpu").contiguous()
        if host.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            host = host.clone()
        seen.add(host.untyped_storage().data_ptr())
        tensors[name] = host
    return base64.b64encode(save(tensors)).decode("ascii")


def encode_shared(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """SGLang's ``MultiprocessingSerializer`` format: base64 of a ``torch.multiprocessing`` pickle.

    CUDA tensors become IPC handles; CPU tensors are moved to shared memory (file-system
    strategy: the receiver opens the file by name, no fd passing between unrelated processes).
    The caller keeps ``named`` alive until the receiver answered."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as tmp

    tmp.set_sharing_strategy("file_system")
    for _, t in named:
        if t.device.type == "cpu":
            t.share_memory_()
    buf = io.BytesIO()
    ForkingPickler(buf).dump(list(named))
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- decoding (the engine side) --------------------------------------------------------------


def decode_named_tensors(
    data: Any, *, allow_shared: bool, max_bytes: int, max_tensors: int = 100_000
) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor)]`` from ``serialized_named_tensors`` (a string, or a list of one: the
    built-in engine has one tensor-parallel rank). ``allow_shared``: the caller is on this host,
    so CUDA-IPC / shared-memory tensors are accepted. ``max_bytes`` bounds the decoded payload
    (and, for shared tensors, each shared storage)."""
    if isinstance(data, list):
        if len(data) != 1:
            raise WireError(f"one entry (tp_size 1) expected, got {len(data)}")
        data = data[0]
    if not isinstance(data, str):
        raise WireError("must be a base64 string (or a list of one)")
    if len(data) // 4 * 3 > max_bytes:
        raise WireError(f"payload of ~{len(data) // 4 * 3} bytes exceeds the limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise WireError(f"not valid base64: {e}") from None
    if raw[:1] == b"\x80":
        if not allow_shared:
            raise WireError(
                "shared-memory / CUDA-IPC tensors (a torch.multiprocessing pickle) are accepted only "
                "from callers on this host; send safetensors bytes instead"
            )
        named = _load_shared(raw, max_bytes)
    elif len(raw) >= 9 and raw[8:9] == b"{":
        named = _load_safetensors(raw)
    else:
        raise WireError("neither safetensors bytes nor a torch.multiprocessing pickle")
    if len(named) > max_tensors:
        raise WireError(f"{len(named)} tensors exceed the limit of {max_tensors}")
    return named


def _load_safetensors(raw: bytes) -> list[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(raw)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise WireError(f"malformed safetensors payload: {e}") from None
    for name in tensors:
        _check_name(name)
    return list(tensors.items())


def _load_shared(raw: bytes, max_bytes: int) -> list[tuple[str, torch.Tensor]]:
    try:
        for op, _, pos in pickletools.genops(raw):
            if op.name not in _ALLOWED_OPCODES:
                raise WireError(f"pickle opcode {op.name} at byte {pos} is not allowed")
    except (ValueError, EOFError) as e:  # genops raises these on a truncated or garbled stream
        if isinstance(e, WireError):
            raise
        raise WireError(f"malformed pickle: {e}") from None
    try:
        named = _TensorUnpickler(io.BytesIO(raw), max_bytes).load()
    except WireError:
        raise
    except Exception as e:  # a rebuild refused by torch (bad handle, out-of-bounds view, ...)
        raise WireError(f"cannot rebuild the shared tensors: {type(e).__name__}: {e}") from None
    if not isinstance(named, list) or not all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], torch.Tensor) for p in named
    ):
        raise WireError("must hold a list of (name, tensor) pairs")
    for name, _ in named:
        _check_name(name)
    return [(n, t) for n, t in named]


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise WireError(f"tensor names must be strings of 1 to {MAX_NAME_CHARS} characters, got {name!r:.80}")


class _TensorUnpickler(pickle.Unpickler):
    """Resolves only the globals of a ``torch.multiprocessing`` tensor pickle, to checked wrappers."""

    def __init__(self, file: io.BytesIO, max_bytes: int) -> None:
        super().__init__(file)
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        allowed: dict[tuple[str, str], Any] = {
            ("torch", "Tensor"): torch.Tensor,
            ("torch", "Size"): torch.Size,
            ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
            ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
            ("torch.multiprocessing.reductions", "rebuild_tensor"): _rebuild_tensor,
            ("torch.multiprocessing.reductions", "rebuild_typed_storage"): _rebuild_typed_storage,
            ("torch.multiprocessing.reductions", "rebuild_storage_empty"): _rebuild_storage_empty,
            ("torch.multiprocessing.reductions", "rebuild_storage_filename"): self._rebuild_storage_filename,
            ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"): self._rebuild_cuda_tensor,
        }
        if (module, name) not in allowed:
            raise WireError(f"pickle global {module}.{name} is not allowed")
        return allowed[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise WireError("persistent ids are not allowed")

    def _rebuild_storage_filename(
        self, cls: Any, manager: Any, handle: Any, size: Any, dtype: Any = None
    ) -> Any:
        from torch.multiprocessing import reductions

        _expect(cls is torch.UntypedStorage, "a shared storage must be an UntypedStorage")
        _expect(isinstance(manager, bytes) and _MANAGER_SOCKET.fullmatch(manager) is not None,
                "bad shared-memory manager path")  # fmt: skip
        _expect(isinstance(handle, bytes) and _SHM_HANDLE.fullmatch(handle) is not None,
                f"bad shared-memory handle {handle!r:.80}")  # fmt: skip
        _expect(dtype is None or dtype in _DTYPES.values(), f"bad storage dtype {dtype!r}")
        nbytes = _int(size, 0, self.max_bytes, "storage size")
        if dtype is not None:
            nbytes *= torch._utils._element_size(dtype)
        # Mapping past the end of the file would fault on first read (SIGBUS), not raise.
        path = os.path.join(_SHM_DIR, handle.decode("ascii").lstrip("/"))
        try:
            st = os.stat(path)
        except OSError:
            raise WireError(f"shared-memory file {path} does not exist (not sent from this host?)") from None
        _expect(st.st_size >= nbytes, f"shared-memory file {path} is smaller than the {nbytes} bytes claimed")
        return reductions.rebuild_storage_filename(cls, manager, handle, size, dtype)

    def _rebuild_cuda_tensor(self, *args: Any) -> torch.Tensor:
        from torch.multiprocessing import reductions

        _expect(len(args) == 15, f"rebuild_cuda_tensor takes 15 arguments, got {len(args)}")
        (tensor_cls, size, stride, offset, storage_cls, dtype, device, handle, storage_bytes,
         storage_offset, requires_grad, ref_handle, ref_offset, event_handle, event_sync) = args  # fmt: skip
        _expect(tensor_cls in (torch.Tensor, torch.nn.Parameter), "bad tensor class")
        _check_view(size, stride, offset)
        _expect(storage_cls is torch.UntypedStorage, "a CUDA storage must be an UntypedStorage")
        _expect(dtype in _DTYPES.values(), f"bad dtype {dtype!r}")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _int(device, 0, max(count - 1, 0), "CUDA device")
        _expect(count > 0, "CUDA tensors sent to an engine without CUDA")
        for value, what in ((handle, "IPC handle"), (ref_handle, "ref-counter handle")):
            _expect(value is None or (isinstance(value, bytes) and len(value) <= _IPC_HANDLE_MAX_BYTES), what)
        _expect(event_handle is None or (isinstance(event_handle, bytes)
                and len(event_handle) <= _IPC_HANDLE_MAX_BYTES), "bad event handle")  # fmt: skip
        _int(storage_bytes, 0, self.max_bytes, "CUDA storage size")
        _int(storage_offset, 0, self.max_bytes, "CUDA storage offset")
        _int(ref_offset, 0, 2**40, "ref-counter offset")
        _expect(isinstance(requires_grad, bool) and isinstance(event_sync, bool), "bad flags")
        return reductions.rebuild_cuda_tensor(*args)


def _rebuild_tensor(cls: Any, storage: Any, metadata: Any) -> torch.Tensor:
    from torch.multiprocessing import reductions

    _expect(cls in (torch.Tensor, torch.nn.Parameter), "bad tensor class")
    _expect(isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)), "a tensor needs a storage")
    _expect(isinstance(metadata, tuple) and len(metadata) == 4, "bad tensor metadata")
    offset, size, stride, requires_grad = metadata
    _check_view(size, stride, offset)
    _expect(isinstance(requires_grad, bool), "bad requires_grad")
    return reductions.rebuild_tensor(cls, storage, metadata)


def _rebuild_typed_storage(storage: Any, dtype: Any) -> torch.TypedStorage:
    from torch.multiprocessing import reductions

    _expect(isinstance(storage, torch.UntypedStorage), "a typed storage wraps an UntypedStorage")
    _expect(dtype in _DTYPES.values(), f"bad storage dtype {dtype!r}")
    return reductions.rebuild_typed_storage(storage, dtype)


def _rebuild_storage_empty(cls: Any) -> torch.UntypedStorage:
    _expect(cls is torch.UntypedStorage, "an empty storage must be an UntypedStorage")
    return torch.UntypedStorage()


def _check_view(size: Any, stride: Any, offset: Any) -> None:
    """Shape and strides as plain non-negative ints (torch checks the view fits its storage)."""
    for dims, what in ((size, "size"), (stride, "stride")):
        _expect(isinstance(dims, tuple) and len(dims) <= _MAX_DIMS, f"bad tensor {what}")
        for d in dims:
            _int(d, 0, 2**48, f"tensor {what}")
    _expect(len(size) == len(stride), "size and stride differ in length")
    _int(offset, 0, 2**48, "tensor offset")


def _int(value: Any, low: int, high: int, what: str) -> int:
    _expect(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
            f"{what} must be an integer in [{low}, {high}], got {value!r:.40}")  # fmt: skip
    return int(value)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise WireError(message)

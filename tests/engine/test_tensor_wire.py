"""The wire format of /update_weights_from_tensor: pickle-free safetensors, and shared-memory
pickles decoded through an allow-list that refuses anything but tensors."""

import base64
import io
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from miles.engine.tensor_wire import WireError, decode_named_tensors, encode_safetensors, encode_shared

MB = 1 << 20


def _decode(data: str, allow_shared: bool = True, **kw: int) -> list[tuple[str, torch.Tensor]]:
    return decode_named_tensors(
        [data], allow_shared=allow_shared, max_bytes=kw.pop("max_bytes", 64 * MB), **kw
    )


def _assert_same(got: list[tuple[str, torch.Tensor]], want: list[tuple[str, torch.Tensor]]) -> None:
    assert [n for n, _ in got] == [n for n, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_safetensors_round_trip_any_dtype_and_shared_storage() -> None:
    w = torch.randn(4, 3)
    named = [
        ("a", w),
        ("b", w),
        ("c", w[1:]),
        ("h", torch.randn(5).to(torch.bfloat16)),
        ("i", torch.arange(3)),
    ]
    _assert_same(sorted(_decode(encode_safetensors(named), allow_shared=False)), named)  # any order


def test_shared_memory_round_trip() -> None:
    w = torch.randn(6, 2)
    named = [("a", w), ("b", torch.nn.Parameter(torch.ones(3)).detach()), ("c", w[2:])]
    want = [(n, t.clone()) for n, t in named]
    _assert_same(_decode(encode_shared(named)), want)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("allow_shared", [True, False])
def test_the_reported_exploit_is_refused_and_never_runs(tmp_path: Path, allow_shared: bool) -> None:
    marker = tmp_path / "pwned"
    payload = base64.b64encode(pickle.dumps(_Exploit(marker))).decode()
    with pytest.raises(WireError, match="posix.system is not allowed|only from callers on this host"):
        _decode(payload, allow_shared=allow_shared)
    assert not marker.exists()


class Built:
    pass


def test_object_building_opcodes_are_refused_before_unpickling(tmp_path: Path) -> None:
    obj = Built()
    obj.x = 1  # type: ignore[attr-defined]
    payload = base64.b64encode(pickle.dumps([("a", obj)], protocol=4)).decode()
    with pytest.raises(WireError, match="opcode .* is not allowed"):
        _decode(payload)


@pytest.mark.parametrize(
    ("module", "name"),
    [("builtins", "eval"), ("torch", "load"), ("torch.multiprocessing.reductions", "rebuild_storage_fd")],
)
def test_only_tensor_globals_resolve(module: str, name: str) -> None:
    raw = b"\x80\x04" + pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode()
    raw += pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode() + pickle.STACK_GLOBAL + pickle.STOP
    with pytest.raises(WireError, match=f"{module}.{name} is not allowed"):
        _decode(base64.b64encode(raw).decode())


def _shared_payload_with_handle(handle: bytes, size: int) -> str:
    """A shared-memory tensor pickle, as torch writes it, with a forged storage handle and size."""
    buf = io.BytesIO()
    from torch.multiprocessing import reductions

    class Forged:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            manager = b"/tmp/torch-shm-dir-x/manager.sock"
            return (reductions.rebuild_storage_filename, (torch.UntypedStorage, manager, handle, size))

    class Tensor:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (
                reductions.rebuild_tensor,
                (torch.Tensor, Forged(), (0, torch.Size([size // 4]), (1,), False)),
            )

    pickle.Pickler(buf, protocol=4).dump([("w", Tensor())])
    return base64.b64encode(buf.getvalue()).decode()


def test_shared_memory_handles_are_checked_before_mapping(tmp_path: Path) -> None:
    with pytest.raises(WireError, match="bad shared-memory handle"):
        _decode(_shared_payload_with_handle(b"/../etc/passwd", 16))
    with pytest.raises(WireError, match="does not exist"):
        _decode(_shared_payload_with_handle(b"/torch_no_such_segment_0", 16))
    small = Path("/dev/shm/torch_miles_test_small_0")
    small.write_bytes(b"\0" * 8)
    try:  # mapping 4096 bytes of an 8-byte file would fault on the first read
        with pytest.raises(WireError, match="smaller than the 4096 bytes claimed"):
            _decode(_shared_payload_with_handle(b"/torch_miles_test_small_0", 4096))
    finally:
        small.unlink()
    with pytest.raises(WireError, match="storage size must be an integer"):
        _decode(_shared_payload_with_handle(b"/torch_x_0", 2 * MB), max_bytes=MB)


def test_sizes_and_counts_are_bounded() -> None:
    named = [(f"t{i}", torch.zeros(1)) for i in range(5)]
    with pytest.raises(WireError, match="5 tensors exceed the limit of 4"):
        _decode(encode_safetensors(named), max_tensors=4)
    with pytest.raises(WireError, match="exceeds the limit of 100 bytes"):
        _decode(encode_safetensors([("w", torch.zeros(1000))]), max_bytes=100)
    with pytest.raises(WireError, match="tensor names must be strings of 1 to 1024"):
        _decode(encode_safetensors([("x" * 1025, torch.zeros(1))]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("!!", "not valid base64"),
        (base64.b64encode(b"hello world, not tensors").decode(), "neither safetensors"),
        (base64.b64encode(pickle.dumps([("a", 1)])[:-3]).decode(), "malformed pickle"),
        (base64.b64encode(struct.pack("<Q", 40) + b'{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}').decode(),
         "malformed safetensors"),
    ],
)  # fmt: skip
def test_garbage_is_a_wire_error(data: str, message: str) -> None:
    with pytest.raises(WireError, match=message):
        _decode(data)


def test_list_of_several_entries_is_refused() -> None:
    with pytest.raises(WireError, match="one entry"):
        decode_named_tensors(["a", "b"], allow_shared=True, max_bytes=MB)

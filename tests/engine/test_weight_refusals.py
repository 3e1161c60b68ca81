"""Refused weight updates change nothing: after every refusal each parameter is bit for bit what
it was and ``weight_version`` is unchanged. Bad versions, NaN/infinite values, unreadable or
half-written checkpoints, and broadcast metadata (checked before any buffer is allocated), through
every update path (tensors, buckets, disk, broadcast) and through ``LLM``."""

from __future__ import annotations

import json
import shutil
import socket
import struct

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from miles.engine.engine import Engine, EngineStateError
from miles.engine.llm import LLM
from miles.engine.weight_load import WeightUpdateError
from miles.engine.weight_sources import init_custom_process_group
from miles.models.loading import load_model
from miles.types import SamplingParams
from tests.engine.conftest import make_engine

BAD_VERSIONS = ["v2", "-5", -5, "1e3", " 5", "5 ", "٣", "", "0x10", True, 2**63, "9" * 20, 1.0, [1]]


def _engine(path) -> Engine:
    return make_engine(load_model(path), num_blocks=32, page_size=4)


def _named(path) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach().clone()) for n, p in load_model(path).named_parameters()]


def _snapshot(engine: Engine) -> tuple[dict[str, torch.Tensor], str]:
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}, engine.weight_version


def _assert_unchanged(engine: Engine, snap: tuple[dict[str, torch.Tensor], str]) -> None:
    params, version = snap
    now = dict(engine.model.named_parameters())
    assert now.keys() == params.keys()
    for name, before in params.items():
        # Bit for bit (NaN-safe): the same bytes, not merely equal values.
        assert torch.equal(now[name].detach().view(torch.int32), before.view(torch.int32)), name
    assert engine.weight_version == version


def _save(path, tensors: dict[str, torch.Tensor], like) -> None:
    """An HF directory at ``path``: ``like``'s config.json and ``tensors`` as model.safetensors."""
    path.mkdir()
    shutil.copy(like / "config.json", path / "config.json")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path / "model.safetensors"))


# ---- versions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_a_bad_version_refuses_every_path_before_any_weight_changes(ckpts, version):
    engine = _engine(ckpts["a"])
    engine.update_weights_from_tensors(_named(ckpts["a"]), weight_version="3")
    snap = _snapshot(engine)
    engine.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_new_tokens=2))
    cached = engine.allocator.num_cached_blocks
    assert cached > 0
    named = _named(ckpts["b"])
    with pytest.raises(WeightUpdateError, match="weight_version"):
        engine.update_weights_from_tensors(named, weight_version=version)
    _assert_unchanged(engine, snap)
    with pytest.raises(WeightUpdateError, match="weight_version"):
        engine.update_weights_from_disk(str(ckpts["b"]), weight_version=version)
    _assert_unchanged(engine, snap)
    engine.begin_weight_update()
    engine.update_weights_bucket(named)
    with pytest.raises(WeightUpdateError, match="weight_version"):
        engine.commit_weight_update(weight_version=version)
    _assert_unchanged(engine, snap)
    assert engine.allocator.num_cached_blocks == cached  # the prefix cache was not flushed either
    engine.commit_weight_update(weight_version="9")  # the session survived the refused commit
    assert all(torch.equal(p, dict(named)[n]) for n, p in engine.model.named_parameters())
    assert engine.weight_version == "9"


def test_good_versions_and_flush_cache_type(ckpts):
    engine = _engine(ckpts["a"])
    engine.update_weights_from_tensors(_named(ckpts["b"]), weight_version=str(2**63 - 1))
    assert engine.weight_version == str(2**63 - 1)
    engine.update_weights_from_tensors(_named(ckpts["a"]), weight_version=0)
    assert engine.weight_version == "0"
    snap = _snapshot(engine)
    with pytest.raises(WeightUpdateError, match="flush_cache must be true or false"):
        engine.update_weights_from_tensors(_named(ckpts["b"]), flush_cache="no")  # type: ignore[arg-type]
    _assert_unchanged(engine, snap)


# ---- values ------------------------------------------------------------------------------------


def _poisoned(path, value: float, dtype: torch.dtype = torch.float32) -> list[tuple[str, torch.Tensor]]:
    """B's tensors with one value of the last tensor replaced (the bad one comes last)."""
    named = [(n, t.to(dtype)) for n, t in _named(path)]
    name, t = named[-1]
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    named[-1] = (name, t)
    return named


POISONS = [
    (float("nan"), torch.float32),
    (float("inf"), torch.float32),
    (float("-inf"), torch.bfloat16),
    (1e300, torch.float64),  # finite, but infinite once cast to the model's float32
    (-1e39, torch.float64),
]


@pytest.mark.parametrize(("value", "dtype"), POISONS)
def test_nonfinite_weights_are_refused_on_every_path(ckpts, tmp_path, value, dtype):
    engine = _engine(ckpts["a"])
    snap = _snapshot(engine)
    named = _poisoned(ckpts["b"], value, dtype)
    bad = named[-1][0]
    with pytest.raises(WeightUpdateError, match=f"{bad}.*NaN or infinite"):
        engine.update_weights_from_tensors(named)
    _assert_unchanged(engine, snap)
    engine.begin_weight_update()
    engine.update_weights_bucket(named[:-1])
    with pytest.raises(WeightUpdateError, match=f"{bad}.*NaN or infinite"):
        engine.update_weights_bucket(named[-1:])
    with pytest.raises(WeightUpdateError, match="abort_weight_update"):
        engine.commit_weight_update()
    engine.abort_weight_update()
    _assert_unchanged(engine, snap)
    _save(tmp_path / "poisoned", dict(named), ckpts["b"])
    with pytest.raises(WeightUpdateError, match=f"{bad}.*NaN or infinite"):
        engine.update_weights_from_disk(str(tmp_path / "poisoned"))
    _assert_unchanged(engine, snap)
    # Log-probs stay finite: the weights in use are A's.
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))[0]
    assert all(torch.isfinite(torch.tensor(out.output_logprobs)))


def test_extreme_but_finite_weights_are_accepted(ckpts):
    engine = _engine(ckpts["a"])
    named = _poisoned(ckpts["b"], torch.finfo(torch.float32).max)
    engine.update_weights_from_tensors(named, weight_version="4")
    assert engine.weight_version == "4"
    assert dict(engine.model.named_parameters())[named[-1][0]].max() == torch.finfo(torch.float32).max


def test_bucket_refused_while_weights_are_released_blocks_the_commit(ckpts):
    engine = _engine(ckpts["a"])
    snap = _snapshot(engine)
    named = _named(ckpts["b"])
    engine.begin_weight_update()
    engine.update_weights_bucket(named[:3])
    engine.release_memory_occupation(["weights"])
    with pytest.raises(EngineStateError, match="weights are released"):
        engine.update_weights_bucket(named[3:])
    engine.resume_memory_occupation(["weights"])
    with pytest.raises(WeightUpdateError, match="weights are released.*abort_weight_update"):
        engine.commit_weight_update()  # a partial sync is never applied
    engine.abort_weight_update()
    _assert_unchanged(engine, snap)


# ---- unreadable checkpoints --------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _truncated(src, dst):
    f = _copy(src, dst) / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])  # a half-written file: the header is intact
    return dst


def _bad_header(src, dst):
    f = _copy(src, dst) / "model.safetensors"
    data = f.read_bytes()
    garbage = b"{not json at all"
    f.write_bytes(struct.pack("<Q", len(garbage)) + garbage + data[8 + len(garbage) :])
    return dst


def _huge_header_length(src, dst):
    f = _copy(src, dst) / "model.safetensors"
    f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:])
    return dst


def _empty_file(src, dst):
    (_copy(src, dst) / "model.safetensors").write_bytes(b"")
    return dst


def _no_config(src, dst):
    (_copy(src, dst) / "config.json").unlink()
    return dst


def _no_weights(src, dst):
    (_copy(src, dst) / "model.safetensors").unlink()
    return dst


def _gguf_garbage(src, dst):
    dst.mkdir()
    (dst / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    return dst


def _gguf_bad_magic(src, dst):
    dst.mkdir()
    (dst / "model.gguf").write_bytes(bytes(range(256)) * 8)
    return dst / "model.gguf"


def _bad_index(src, dst):
    d = _copy(src, dst)
    (d / "model.safetensors.index.json").write_text("{truncated")
    return dst


def _index_outside(src, dst):
    d = _copy(src, dst)
    (d / "model.safetensors").rename(d / "shard.safetensors")
    (d.parent / "elsewhere.safetensors").write_bytes((d / "shard.safetensors").read_bytes())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}})
    )
    return dst


def _int_tensor(src, dst):
    tensors = dict(_named(src))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    _save(dst, tensors, src)
    return dst


def _wrong_shape(src, dst):
    tensors = dict(_named(src))
    tensors["model.norm.weight"] = torch.ones(10**4)
    _save(dst, tensors, src)
    return dst


def _duplicate_across_shards(src, dst):
    tensors = dict(_named(src))
    _save(dst, tensors, src)
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, str(dst / "extra.safetensors"))
    return dst


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_truncated, "model.safetensors.*(incomplete|not fully covered)"),
        (_bad_header, "model.safetensors"),
        (_huge_header_length, "model.safetensors.*header"),
        (_empty_file, "model.safetensors.*header"),
        (_no_config, "no config.json"),
        (_no_weights, r"no \*.safetensors"),
        (_gguf_garbage, "model.gguf"),
        (_gguf_bad_magic, "model.gguf.*magic"),
        (_bad_index, "index.json.*not a safetensors index"),
        (_index_outside, "lists '../elsewhere.safetensors', which is not a file in"),
        (_int_tensor, "model.norm.weight.*I32, not a floating type"),
        (_wrong_shape, r"model.norm.weight.*shape \(10000,\)"),
        (_duplicate_across_shards, "model.norm.weight.*also in"),
    ],
)
def test_unreadable_checkpoints_are_refused_naming_the_file(ckpts, tmp_path, make, match):
    engine = _engine(ckpts["a"])
    snap = _snapshot(engine)
    path = make(ckpts["b"], tmp_path / "ckpt")
    with pytest.raises(WeightUpdateError, match=match):
        engine.update_weights_from_disk(str(path), weight_version="1")
    _assert_unchanged(engine, snap)


def test_half_written_gguf_is_refused(ckpts, tmp_path):
    pytest.importorskip("gguf")
    from tests.models.helpers import write_gguf

    engine = _engine(ckpts["a"])
    snap = _snapshot(engine)
    path = tmp_path / "model.gguf"
    write_gguf(load_model(ckpts["b"]), "llama", path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightUpdateError, match="model.gguf"):
        engine.update_weights_from_disk(str(path), weight_version="1")
    _assert_unchanged(engine, snap)


# ---- broadcast ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meta(named):
    return (
        [n for n, _ in named],
        [str(t.dtype).removeprefix("torch.") for _, t in named],
        [list(t.shape) for _, t in named],
    )


@pytest.fixture
def solo_group_engine(ckpts):
    """An engine in a broadcast group of its own (world size 1: a broadcast receives nothing, so
    any update that got as far as receiving would write uninitialised memory)."""
    engine = _engine(ckpts["a"])
    engine.add_weights_update_group(
        "solo", init_custom_process_group("127.0.0.1", _free_port(), 0, 1, "solo")
    )
    yield engine
    engine.destroy_weights_update_group("solo")


def _swap(named, i, item):
    named = list(named)
    named[i] = item
    return named


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: (m[0], m[1], _swap(m[2], 0, [10**12])), r"shape \(1000000000000,\)"),
        (lambda m: (m[0], m[1], _swap(m[2], 1, [2**62, 2**62])), "shape"),
        (lambda m: (m[0], m[1], _swap(m[2], 1, [-1, 64])), "shape must be a list of integers >= 0"),
        (lambda m: (m[0], m[1], _swap(m[2], 1, "64")), "shape must be a list of integers >= 0"),
        (lambda m: (_swap(m[0], 1, "model.nope.weight"), m[1], m[2]), "model.nope.weight.*no such parameter"),
        (lambda m: (_swap(m[0], 1, m[0][0]), m[1], m[2]), "named twice"),
        (lambda m: (m[0] * 2, m[1] * 2, m[2] * 2), "tensors for a model of"),
        (lambda m: (m[0], _swap(m[1], 0, "int64"), m[2]), "not floating point"),
        (lambda m: (m[0], _swap(m[1], 0, "os.system"), m[2]), "unknown dtype"),
        (lambda m: (m[0], m[1][:-1], m[2]), "differ in length"),
        (lambda m: (m[0], "float32", m[2]), "dtypes must be a list"),
    ],
)
def test_broadcast_metadata_is_checked_before_any_allocation(solo_group_engine, ckpts, edit, match):
    engine = solo_group_engine
    snap = _snapshot(engine)
    names, dtypes, shapes = edit(_meta(_named(ckpts["b"])))
    with pytest.raises(WeightUpdateError, match=match):
        engine.update_weights_from_distributed(names, dtypes, shapes, "solo", weight_version="1")
    _assert_unchanged(engine, snap)


@pytest.mark.parametrize("version", ["v2", -5])
def test_broadcast_version_is_checked_before_receiving(solo_group_engine, ckpts, version):
    engine = solo_group_engine
    snap = _snapshot(engine)
    with pytest.raises(WeightUpdateError, match="weight_version"):
        engine.update_weights_from_distributed(*_meta(_named(ckpts["b"])), "solo", weight_version=version)
    _assert_unchanged(engine, snap)


def _poisoning_trainer(port: int, path: str) -> None:
    """Rank 0: broadcast checkpoint ``path`` with a NaN in its last tensor, then the clean one."""
    group = init_custom_process_group("127.0.0.1", port, 0, 2, "sync", "gloo")
    for _, t in _poisoned(path, float("nan")):
        group.broadcast(t.contiguous(), 0)
    for _, t in _named(path):
        group.broadcast(t.contiguous(), 0)


def test_received_nonfinite_broadcast_is_refused_and_the_group_goes_on(ckpts):
    engine = _engine(ckpts["a"])
    snap = _snapshot(engine)
    port = _free_port()
    trainer = mp.get_context("spawn").Process(target=_poisoning_trainer, args=(port, str(ckpts["b"])))
    trainer.start()
    try:
        engine.init_weights_update_group("127.0.0.1", port, 1, 2, "sync", backend="gloo")
        named = _named(ckpts["b"])
        with pytest.raises(WeightUpdateError, match=f"{named[-1][0]}.*NaN or infinite"):
            engine.update_weights_from_distributed(*_meta(named), "sync", weight_version="5")
        _assert_unchanged(engine, snap)
        engine.update_weights_from_distributed(*_meta(named), "sync", weight_version="6")
        trainer.join(timeout=60)
        assert trainer.exitcode == 0
    finally:
        if trainer.is_alive():
            trainer.kill()
        engine.destroy_weights_update_group("sync")
    assert all(torch.equal(p, dict(named)[n]) for n, p in engine.model.named_parameters())
    assert engine.weight_version == "6"


# ---- through LLM -------------------------------------------------------------------------------


def test_llm_refusals_leave_weights_and_version(ckpts, tmp_path):
    llm = LLM(str(ckpts["a"]), skip_tokenizer_init=True, max_total_tokens=32 * 4, page_size=4, random_seed=0)
    snap = _snapshot(llm.engine)
    for version in ("v2", "-5"):
        with pytest.raises(WeightUpdateError, match="weight_version"):
            llm.update_weights_from_disk(str(ckpts["b"]), weight_version=version)
        _assert_unchanged(llm.engine, snap)
    with pytest.raises(WeightUpdateError, match="NaN or infinite"):
        llm.update_weights_from_tensors(_poisoned(ckpts["b"], float("inf")))
    with pytest.raises(WeightUpdateError, match="model.safetensors"):
        llm.update_weights_from_disk(str(_truncated(ckpts["b"], tmp_path / "t")))
    _assert_unchanged(llm.engine, snap)
    outs = llm.generate([[1, 2, 3]], {"max_new_tokens": 3, "temperature": 0}, return_logprob=True)
    assert outs[0]["meta_info"]["weight_version"] == "0"

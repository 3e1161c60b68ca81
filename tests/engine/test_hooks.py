"""Engine RL hooks on tiny random models (CPU, fp32): weight updates (tensors, buckets, disk,
gloo broadcast from a second process), weight versions, pause/continue, release/resume memory."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
import torch.multiprocessing as mp

from miles.engine.engine import Engine, EngineStateError
from miles.engine.weight_load import WeightUpdateError
from miles.engine.weight_sources import init_custom_process_group
from miles.models.loading import load_model, save_hf
from miles.types import SamplingParams
from tests.engine.conftest import make_engine
from tests.models.conftest import save_case

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (5, 9, 17, 2)]


def _engine(path, **kw) -> Engine:
    return make_engine(load_model(path), num_blocks=64, page_size=4, **kw)


def _ids(engine: Engine, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [list(o.output_ids) for o in engine.generate(_prompts(), params)]


@pytest.fixture(scope="module")
def ref(ckpts):
    """Greedy outputs of fresh engines over A and over B."""
    return {tag: _ids(_engine(path)) for tag, path in ckpts.items()}


def _named(path) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach().clone()) for n, p in load_model(path).named_parameters()]


# ---- weight updates --------------------------------------------------------------------------


def test_update_from_tensors_switches_outputs_and_flushes_cache(ckpts, ref):
    engine = _engine(ckpts["a"])
    assert engine.weight_version == "0"
    assert _ids(engine) == ref["a"]  # fills the prefix cache with K/V of A
    engine.update_weights_from_tensors(_named(ckpts["b"]), weight_version="7")
    outs = engine.generate(_prompts(), GREEDY)
    assert [list(o.output_ids) for o in outs] == ref["b"]
    assert all(o.cached_tokens == 0 for o in outs)  # nothing computed under A is reused
    assert {str(o.weight_version) for o in outs} == {"7"} and engine.get_weight_version() == "7"
    engine.update_weights_from_tensors(_named(ckpts["a"]))  # no version given: the next one
    assert engine.weight_version == "8" and _ids(engine) == ref["a"]


def test_bucketed_update_casts_and_accepts_tied_lm_head(ckpts, ref):
    engine = _engine(ckpts["a"], weight_version="3")
    named = [(n, t.double()) for n, t in _named(ckpts["b"])]  # castable floating dtype
    emb = dict(named)["model.embed_tokens.weight"]
    engine.begin_weight_update()
    engine.update_weights_bucket(named[: len(named) // 2])
    assert _ids(engine) == ref["a"]  # staged, not applied
    engine.update_weights_bucket([*named[len(named) // 2 :], ("lm_head.weight", emb)])
    engine.commit_weight_update()
    assert _ids(engine) == ref["b"] and engine.weight_version == "4"


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (("model.layers.0.mlp.nope.weight", torch.zeros(3)), "model.layers.0.mlp.nope.weight"),
        (("model.norm.weight", torch.ones(65)), r"model.norm.weight.*shape \(65,\)"),
        (("model.norm.weight", torch.ones(64, dtype=torch.int64)), "model.norm.weight.*not floating"),
    ],
)
def test_bad_update_changes_nothing(ckpts, ref, bad, match):
    engine = _engine(ckpts["a"])
    before = {n: p.clone() for n, p in engine.model.named_parameters()}
    with pytest.raises(WeightUpdateError, match=match):
        engine.update_weights_from_tensors([*_named(ckpts["b"]), bad])  # the bad one comes last
    assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
    assert _ids(engine) == ref["a"] and engine.weight_version == "0"


def test_failed_bucket_blocks_commit_until_abort(ckpts, ref):
    engine = _engine(ckpts["a"])
    named = _named(ckpts["b"])
    engine.begin_weight_update()
    engine.update_weights_bucket(named[:3])
    with pytest.raises(WeightUpdateError, match="model.norm.weight"):
        engine.update_weights_bucket([*named[3:], ("model.norm.weight", torch.ones(2, 2))])
    with pytest.raises(WeightUpdateError, match="abort_weight_update"):
        engine.commit_weight_update()
    engine.abort_weight_update()
    assert _ids(engine) == ref["a"] and engine.weight_version == "0"
    with pytest.raises(WeightUpdateError, match="begin_weight_update"):
        engine.commit_weight_update()


def test_update_from_disk_round_trip(ckpts, ref, tmp_path):
    engine = _engine(ckpts["a"])
    save_hf(load_model(ckpts["b"]), tmp_path / "b")
    engine.update_weights_from_disk(str(tmp_path / "b"), weight_version="2")
    assert _ids(engine) == ref["b"] and engine.weight_version == "2"
    save_case("qwen3", tmp_path / "q")  # another architecture: shapes and names differ
    with pytest.raises(WeightUpdateError):
        engine.update_weights_from_disk(str(tmp_path / "q"))
    assert _ids(engine) == ref["b"] and engine.weight_version == "2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(port: int, path: str) -> None:
    """Rank 0 of the update group: broadcast every parameter of checkpoint ``path``."""
    group = init_custom_process_group("127.0.0.1", port, 0, 2, "sync", "gloo")
    for _, t in _named(path):
        group.broadcast(t.contiguous(), 0)


def test_update_from_distributed_gloo(ckpts, ref):
    engine = _engine(ckpts["a"])
    port = _free_port()
    trainer = mp.get_context("spawn").Process(target=_trainer, args=(port, str(ckpts["b"])))
    trainer.start()
    try:
        engine.init_weights_update_group("127.0.0.1", port, 1, 2, "sync", backend="gloo")
        named = _named(ckpts["b"])
        engine.update_weights_from_distributed(
            [n for n, _ in named],
            [str(t.dtype).removeprefix("torch.") for _, t in named],
            [list(t.shape) for _, t in named],
            "sync",
            weight_version="5",
        )
        trainer.join(timeout=60)
        assert trainer.exitcode == 0
    finally:
        if trainer.is_alive():
            trainer.kill()
        engine.destroy_weights_update_group("sync")
    params = dict(engine.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in named)
    assert _ids(engine) == ref["b"] and engine.weight_version == "5"


# ---- pause and continue ----------------------------------------------------------------------


def test_pause_abort_reports_partial_outputs_and_frees_blocks(ckpts, ref):
    engine = _engine(ckpts["a"])
    ids = [engine.add_request(p, GREEDY) for p in _prompts()]
    for _ in range(4):
        engine.step()
    engine.pause_generation("abort")
    assert engine.is_paused
    outs = {o.request_id: o for o in engine.step()}
    assert set(outs) == set(ids)
    for i, rid in enumerate(ids):
        out = outs[rid]
        assert out.finish_reason is not None and out.finish_reason.type == "abort"
        assert 0 < len(out.output_ids) < GREEDY.max_new_tokens
        assert list(out.output_ids) == ref["a"][i][: len(out.output_ids)]
        assert len(out.output_logprobs) == len(out.output_ids)
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    assert engine.step() == []
    with pytest.raises(EngineStateError, match="paused"):
        engine.generate(_prompts(), GREEDY)
    engine.continue_generation()
    assert _ids(engine) == ref["a"]


def test_pause_in_place_then_continue_matches_uninterrupted(ckpts, ref):
    engine = _engine(ckpts["a"])
    ids = [engine.add_request(p, GREEDY) for p in _prompts()]
    for _ in range(5):
        engine.step()
    engine.pause_generation("in_place")
    lens = [len(engine._requests[r].output_ids) for r in ids]
    for _ in range(3):
        assert engine.step() == []  # no forward while paused
    assert [len(engine._requests[r].output_ids) for r in ids] == lens
    engine.continue_generation()
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: list(o.output_ids) for o in engine.step() if o.finished})
    assert [done[r] for r in ids] == ref["a"]


# ---- release and resume memory ---------------------------------------------------------------


@pytest.mark.parametrize("tags", [("weights",), ("kv_cache",), ("weights", "kv_cache")])
def test_release_resume_round_trip(ckpts, ref, tags):
    engine = _engine(ckpts["a"])
    assert _ids(engine) == ref["a"]
    before = {n: p.clone() for n, p in engine.model.named_parameters()}
    engine.release_memory_occupation(tags)
    assert engine.released_tags == tags
    if "weights" in tags:
        assert all(p.numel() == 0 for p in engine.model.parameters())
        with pytest.raises(EngineStateError, match="weights are released"):
            engine.update_weights_from_tensors(_named(ckpts["b"]))
    if "kv_cache" in tags:
        assert engine.kv_cache.k == [] and engine.kv_cache.v == []
    with pytest.raises(EngineStateError, match="memory is released"):
        engine.add_request([1, 2, 3], GREEDY)
    engine.release_memory_occupation(tags)  # already released: nothing to do
    engine.resume_memory_occupation(tags)
    assert engine.released_tags == ()
    assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
    outs = engine.generate(_prompts(), GREEDY)
    assert [list(o.output_ids) for o in outs] == ref["a"]
    if "kv_cache" in tags:
        assert all(o.cached_tokens == 0 for o in outs)  # the prefix cache went with the K/V


def test_release_refused_while_busy_and_bad_tags(ckpts):
    engine = _engine(ckpts["a"])
    engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(EngineStateError, match="1 waiting"):
        engine.release_memory_occupation()
    with pytest.raises(ValueError, match="unknown memory tags"):
        engine.resume_memory_occupation(["gpu"])
    engine.abort()
    engine.step()
    engine.release_memory_occupation()
    engine.resume_memory_occupation()


def test_text_trims_the_matched_stop_token_and_honours_skip_special_tokens(arith_world):
    """Regression: the matched stop token ('<eos>') stayed in `text`, so exact-match rewards
    scored every correct answer 0."""
    from miles.models.loading import load_model as _load
    from miles.models.loading import load_tokenizer as _tok
    from miles.types import SamplingParams as _SP
    from tests.engine.conftest import make_engine

    tok = _tok(arith_world / "model")
    engine = make_engine(_load(arith_world / "model"), tok, num_blocks=64, page_size=8)
    prompt = tok.encode("<|user|>1+2=?<|assistant|>", add_special_tokens=False)
    first = engine.generate([prompt], _SP(max_new_tokens=1, temperature=0))[0].output_ids[0]
    stop = _SP(max_new_tokens=4, temperature=0, stop_token_ids=(first,), skip_special_tokens=False)
    out = engine.generate([prompt], stop)[0]
    assert out.finish_reason.type == "stop" and list(out.output_ids) == [first] and out.text == ""
    kept = engine.generate([prompt], dataclasses.replace(stop, no_stop_trim=True))[0]
    assert kept.text == tok.decode([first], skip_special_tokens=False)
    from miles.engine.request import Request as _Request
    from miles.engine.stopping import decode_text

    eos = tok.eos_token_id
    for skip, text in ((False, "3<eos>"), (True, "3")):
        req = _Request("d", [1], _SP(skip_special_tokens=skip))
        req.output_ids = [9, eos]
        decode_text(req, tok)
        assert (req.text, req.decoded_upto) == (text, 2)

"""Weight export: buckets of full HF-named tensors, equal to the state dict, size-bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miles.train.parallelize import parallelize
from miles.train.weight_export import iter_weight_buckets, weight_names
from tests.spawn import exits_cleanly
from tests.train.helpers import make_model


def _expected(case: str) -> dict[str, torch.Tensor]:
    model = make_model(case)
    state = model.state_dict()
    if model.spec.tie_word_embeddings:
        del state["lm_head.weight"]  # tied: sent once, as embed_tokens
    return state


@pytest.mark.parametrize("case", ["llama", "qwen3_moe"])
def test_buckets_concatenate_to_the_state_dict(case: str) -> None:
    model = make_model(case)
    want = _expected(case)
    largest = max(t.numel() * t.element_size() for t in want.values())
    bucket_bytes = largest // 2 + 1  # the largest tensors get buckets of their own
    buckets = list(iter_weight_buckets(model, torch.float32, bucket_bytes))
    got = [(n, t) for b in buckets for n, t in b]
    assert [n for n, _ in got] == list(want) == weight_names(model)
    for n, t in got:
        assert torch.equal(t, want[n]), n
    for b in buckets:
        size = sum(t.numel() * t.element_size() for _, t in b)
        assert size <= bucket_bytes or len(b) == 1
    assert any(len(b) > 1 for b in buckets)


def test_buckets_cast_to_the_engine_dtype() -> None:
    model = make_model("llama")
    got = dict(t for b in iter_weight_buckets(model, torch.bfloat16, 1 << 20) for t in b)
    for n, t in _expected("llama").items():
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], t.to(torch.bfloat16)), n
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(iter_weight_buckets(model, None, 0))


WORLD = 2


@exits_cleanly
def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = parallelize(make_model("qwen3_moe"))
        buckets = list(iter_weight_buckets(model, torch.float32, 64 * 1024))
        torch.save(buckets, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.barrier()  # no rank tears gloo down while its peer still uses it
        dist.destroy_process_group()


def test_fsdp2_two_ranks_gather_full_tensors(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    want = _expected("qwen3_moe")
    for rank in range(WORLD):  # every rank receives the same full tensors
        buckets = torch.load(tmp_path / f"rank{rank}.pt")
        got = [(n, t) for b in buckets for n, t in b]
        assert [n for n, _ in got] == list(want)
        for n, t in got:
            assert type(t) is torch.Tensor and torch.equal(t, want[n]), n

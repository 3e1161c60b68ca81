"""FSDP2 over two gloo processes equals one process on the same global batch, to rounding.

The two layouts sum in different orders (per-rank partial gradients, then an all-reduce; other
micro-batch shapes), so they agree within the bounds of ``tests/tolerance.py``, not bit for bit:
metrics and AdamW moments (the step's clipped gradient) to ``reduction_tol``, parameters to
``adam_atol``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miles.train.packing import shard_for_rank
from miles.train.parallelize import parallelize
from miles.train.trainer import Trainer
from tests.spawn import exits_cleanly
from tests.tolerance import (
    adam_states,
    assert_adam_close,
    assert_metrics_close,
    assert_moments_close,
    num_elements,
    step_terms,
)
from tests.train.helpers import make_batch, make_model, sections

WORLD = 2
LENGTHS = (7, 12, 5, 9, 11, 6, 14)  # odd count and uneven lengths: the ranks' shards differ
CONFIG: dict[str, Any] = dict(
    lr=1e-2,
    clip_grad=0.01,  # active (norm ~0.02): the clipped norm must be the global one
    use_kl_loss=True,
    kl_loss_coef=0.1,
    entropy_coef=0.01,
    use_tis=True,
)
# Token budget: the ranks' first-fit splits differ in count (2 vs 3), so one rank re-splits.
# One sequence per micro-batch: 3 vs 4 sequences, so one rank runs an empty padding micro-batch.
SPLITS = {
    "budget": dict(use_dynamic_batch_size=True, max_tokens_per_gpu=16),
    "fixed": dict(micro_batch_size=1),
}


def _inputs() -> tuple[Any, torch.Tensor, torch.Tensor]:
    batch = make_batch(LENGTHS)
    old = make_batch(LENGTHS, seed=1).rollout_logprobs * 0.5
    ref = make_batch(LENGTHS, seed=2).rollout_logprobs
    return batch, old, ref


def _slice_tokens(x: torch.Tensor, batch: Any, rank: int) -> torch.Tensor:
    # The same balanced split as shard_for_rank, applied to a loose [T] tensor.
    from miles.train.packing import balanced_partition, select_tokens, sequence_lengths

    idx = balanced_partition(sequence_lengths(batch), WORLD)[rank]
    return select_tokens(x, batch.cu_seqlens, idx)


@exits_cleanly
def _worker(rank: int, init_file: str, out_dir: str, case: str, checkpointing: bool, split: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = parallelize(make_model(case), activation_checkpointing=checkpointing)
        trainer = Trainer(model, *sections(**CONFIG, **SPLITS[split]))
        batch, old, ref = _inputs()
        local = shard_for_rank(batch, rank, WORLD)
        metrics = trainer.train_step(local, _slice_tokens(old, batch, rank), _slice_tokens(ref, batch, rank))
        params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        states = adam_states(trainer.optimizer, model)  # every rank gathers
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        if rank == 0:
            result = {"params": params, "states": states, "metrics": metrics, "tied": tied}
            torch.save(result, Path(out_dir) / "result.pt")
    finally:
        # Every rank reaches this point before any tears gloo down: a rank that destroys the group
        # while its peer still talks to it dies with SIGABRT (seen in CI).
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("case", "checkpointing", "split"),
    [("llama", False, "budget"), ("llama", False, "fixed"), ("qwen3_moe", True, "budget")],
)
def test_fsdp2_two_ranks_equals_single_process(
    tmp_path: Path, case: str, checkpointing: bool, split: str
) -> None:
    args = (str(tmp_path / "init"), str(tmp_path), case, checkpointing, split)
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "result.pt")

    torch.manual_seed(0)
    model = make_model(case)
    trainer = Trainer(model, *sections(**CONFIG, **SPLITS[split]))
    batch, old, ref = _inputs()
    want_metrics = trainer.train_step(batch, old, ref)

    # The tie survives fully_shard (llama is tied, qwen3_moe is not).
    assert got["tied"] == (model.lm_head.weight is model.model.embed_tokens.weight) == (case == "llama")
    # The step's sums; clipping is active, so the gradient norm's sum of squares (one term per
    # parameter element, a metric too) scales every clipped gradient.
    terms, norm = step_terms(model.spec, sum(LENGTHS)), num_elements(model)
    assert_metrics_close(got["metrics"], want_metrics, terms + norm)
    cfg = trainer.train_config
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    states = adam_states(trainer.optimizer, model)
    assert_moments_close(got["states"], states, betas, terms, norm)
    want = {n: p.detach() for n, p in model.named_parameters()}
    lr = want_metrics["train/lr"]
    assert_adam_close(got["params"], want, states, lr, betas, cfg.adam_eps, terms, norm)

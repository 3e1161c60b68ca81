"""Expert parallelism over two gloo processes equals one process on the same global batch.

One spawn covers the whole contract (spawning is the slow part): a 2-rank EP step (with FSDP2,
activation checkpointing, token-budget micro-batches and R2 routing replay) against the
single-process step (metrics, AdamW moments and updated parameters); weight export gathering
every expert under its HF name; checkpoints saved with EP 1 loaded with EP 2 and the other way
round, bit for bit, the next step then matching the run that saved it (optimizer state included).

The layouts sum in different orders (per-rank partial gradients, other micro-batch shapes), so
the steps agree to rounding, within the bounds of ``tests/tolerance.py``; loading is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miles.models.moe import SparseMoeBlock
from miles.train.checkpoint import load_checkpoint, save_checkpoint
from miles.train.expert_parallel import ExpertParallelLayout, LocalExperts, shard_experts
from miles.train.packing import shard_for_rank
from miles.train.parallelize import parallelize
from miles.train.trainer import Trainer
from miles.train.weight_export import iter_weight_buckets, weight_names
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
CASE = "qwen3_moe"  # 4 experts, top-2: two per EP rank
LENGTHS = (7, 12, 5, 9, 11, 6, 14)
CONFIG: dict[str, Any] = dict(
    lr=1e-2,
    clip_grad=0.004,  # active (norm ~0.009): the norm must be the global one, experts counted once
    entropy_coef=0.01,
    use_tis=True,
    use_dynamic_batch_size=True,
    max_tokens_per_gpu=16,  # several micro-batches, uneven between ranks
    gradient_checkpointing=True,
    use_routing_replay=True,  # R2 under EP: routing happens before the dispatch
    moe_z_loss_coeff=0.01,  # (the load-balancing loss is per micro-batch: splits differ)
)


def _batches() -> tuple[Any, Any]:
    return make_batch(LENGTHS), make_batch(LENGTHS, seed=3)


def _step(trainer: Trainer, batch: Any, rank: int | None) -> dict[str, float]:
    local = batch if rank is None else shard_for_rank(batch, rank, WORLD)
    return trainer.train_step(local)


def _exported(model: Any) -> dict[str, torch.Tensor]:
    return {n: t.clone() for bucket in iter_weight_buckets(model, None, 1 << 14) for n, t in bucket}


@exits_cleanly
def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    out = Path(out_dir)
    try:
        model = parallelize(make_model(CASE), expert_parallel_size=WORLD)
        experts = model.model.layers[0].mlp.experts
        owned = sorted(int(k) for k in experts)  # type: ignore[union-attr]
        trainer = Trainer(model, *sections(**CONFIG))
        b1, b2 = _batches()
        m1 = _step(trainer, b1, rank)
        names, exported = weight_names(model), _exported(model)  # every rank iterates
        save_checkpoint(out / "ep2", trainer, step=1)
        # A fresh EP-2 trainer from other weights resumes the single-process checkpoint.
        other = Trainer(
            parallelize(make_model(CASE, seed=5), expert_parallel_size=WORLD), *sections(**CONFIG)
        )
        load_checkpoint(out / "ep1", other)
        resumed = _exported(other.model)
        m2 = _step(other, b2, rank)
        after = _exported(other.model)
        # The EP-2 run goes on from its checkpoint's state: what the EP-1 trainer loading it must match.
        m3 = _step(trainer, b2, rank)
        after3 = _exported(trainer.model)
        if rank == 0:
            saved = dict(m1=m1, names=names, exported=exported, resumed=resumed, m2=m2, after=after)
            torch.save(dict(saved, owned=owned, m3=m3, after3=after3), out / "rank0.pt")
        else:
            torch.save(dict(owned=owned), out / "rank1.pt")
    finally:
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
        dist.destroy_process_group()


def _terms(trainer: Trainer) -> tuple[int, int]:
    """The sums behind a step's values (``tests/tolerance.py``) and, clipping being active, those
    of the gradient norm (one square per parameter element), which scales every clipped gradient."""
    return step_terms(trainer.model.spec, sum(LENGTHS)), num_elements(trainer.model)


def _close(got: dict[str, float], want: dict[str, float], trainer: Trainer) -> None:
    # train/moe_aux_loss is a per-micro-batch product of means: the splits differ.
    assert_metrics_close(got, want, sum(_terms(trainer)), skip={"train/moe_aux_loss"})


def _params_close(got: dict[str, torch.Tensor], trainer: Trainer, lr: float, before: Any) -> None:
    """``got`` is ``trainer``'s step in another layout, from the same parameters and optimizer
    state (``before``: its ``adam_states``, ``None`` for the first step)."""
    cfg = trainer.train_config
    want = {n: t.detach() for n, t in trainer.model.state_dict().items()}
    states = adam_states(trainer.optimizer, trainer.model)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    assert_adam_close(got, want, states, lr, betas, cfg.adam_eps, *_terms(trainer), before=before)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in trainer.model.state_dict().items()}


def test_two_rank_expert_parallel_step_export_and_checkpoints(tmp_path: Path) -> None:
    # The single-process run: step 1, its checkpoint (for the EP run to load), step 2.
    b1, b2 = _batches()
    single = Trainer(make_model(CASE), *sections(**CONFIG))
    betas = (single.train_config.adam_beta1, single.train_config.adam_beta2)
    want1 = _step(single, b1, None)
    after1, moments1 = _state(single), adam_states(single.optimizer, single.model)
    save_checkpoint(tmp_path / "ep1", single, step=1)
    want2 = _step(single, b2, None)

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "rank0.pt")
    assert got["owned"] == [0, 1] and torch.load(tmp_path / "rank1.pt")["owned"] == [2, 3]

    # The EP step equals the single-process step; export gives every expert, HF names, same order.
    _close(got["m1"], want1, single)
    assert got["names"] == list(after1)
    lr1 = want1["train/lr"]
    assert_adam_close(
        got["exported"], after1, moments1, lr1, betas, single.train_config.adam_eps, *_terms(single)
    )
    # Saved with EP 1, loaded with EP 2: same weights, and the next step (optimizer state) matches.
    for n, t in after1.items():
        torch.testing.assert_close(got["resumed"][n], t, rtol=0, atol=0, msg=n)
    _close(got["m2"], want2, single)
    _params_close(got["after"], single, want2["train/lr"], moments1)

    # Saved with EP 2, loaded with EP 1: the EP run's weights bit for bit, its AdamW moments (its
    # first step's gradients) those of the single process to rounding, and the next step that of
    # the EP run going on from the same state.
    back = Trainer(make_model(CASE, seed=5), *sections(**CONFIG))
    load_checkpoint(tmp_path / "ep2", back)
    for n, p in back.model.state_dict().items():
        torch.testing.assert_close(p, got["exported"][n], rtol=0, atol=0, msg=n)
    loaded = adam_states(back.optimizer, back.model)
    assert_moments_close(loaded, moments1, betas, *_terms(back))
    m3 = _step(back, b2, None)
    _close(got["m3"], m3, back)
    _params_close(got["after3"], back, m3["train/lr"], loaded)


def test_experts_must_divide_evenly() -> None:
    model = make_model(CASE)
    with pytest.raises(ValueError, match="expert_parallel_size 3 must divide num_experts 4"):
        shard_experts(model, ExpertParallelLayout(3, 0, None, None))
    shard_experts(model, ExpertParallelLayout(2, 1, None, None))
    block = model.model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock) and isinstance(block.experts, LocalExperts)
    first = next(n for n, _ in block.named_parameters() if n.startswith("experts."))
    assert first == "experts.2.gate_proj.weight"


def test_local_experts_is_no_module_container():
    """torch 2.11's ``fully_shard`` refuses every ``ModuleDict``/``ModuleList`` (forward or not):
    the EP expert container must be a plain module that still iterates its global expert ids
    (found on an H100 with torch 2.11; torch 2.13 only refuses containers without a forward)."""
    from torch import nn

    from miles.models.layers import SwiGLUMLP
    from miles.train.expert_parallel import LocalExperts

    experts = LocalExperts({"4": SwiGLUMLP(8, 16), "5": SwiGLUMLP(8, 16)})
    assert not isinstance(experts, (nn.ModuleDict, nn.ModuleList))
    assert list(experts) == ["4", "5"] and len(experts.values()) == 2
    assert sorted(n.split(".")[0] for n, _ in experts.named_parameters()) == ["4"] * 3 + ["5"] * 3

"""Checkpoints: exact resume (1 process and 2 FSDP2 ranks), atomic saves, errors, HF export."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miles.models.loading import CheckpointError
from miles.train import checkpoint as ckpt
from miles.train.checkpoint import export_hf, latest_step, load_checkpoint, save_checkpoint
from miles.train.packing import shard_for_rank
from miles.train.parallelize import parallelize
from miles.train.trainer import Trainer
from tests.spawn import exits_cleanly
from tests.train.helpers import (
    CHECKPOINT_CONFIG,
    assert_bitwise,
    checkpoint_batch,
    checkpoint_model,
    checkpoint_trainer,
    make_model,
    sections,
    trainer_params,
)


@pytest.mark.parametrize("critic", [False, True])
def test_resume_reproduces_next_step_exactly(tmp_path: Path, critic: bool) -> None:
    trainer = checkpoint_trainer(critic=critic)
    for step in range(1, 4):
        trainer.train_step(checkpoint_batch(step))
    save_checkpoint(tmp_path, trainer, 3, {"data_position": 42, "rollout_id": 3})
    rng_after_save = (random.random(), float(np.random.rand()), torch.rand(3))
    want = trainer.train_step(checkpoint_batch(4))
    want_params = trainer_params(trainer)

    fresh = checkpoint_trainer(seed=7, critic=critic)  # different weights: everything must come from disk
    extra = load_checkpoint(tmp_path, fresh)
    assert extra == {"data_position": 42, "rollout_id": 3}
    assert fresh.step == 3 and latest_step(tmp_path) == 3
    rng_after_load = (random.random(), float(np.random.rand()), torch.rand(3))
    assert rng_after_load[:2] == rng_after_save[:2] and torch.equal(rng_after_load[2], rng_after_save[2])
    got = fresh.train_step(checkpoint_batch(4))
    assert got.keys() == want.keys()
    for k in want:  # bit-identical floats, loss included
        assert torch.equal(torch.tensor(got[k]), torch.tensor(want[k])), k
    assert_bitwise(trainer_params(fresh), want_params)


def test_a_sleeping_trainer_is_saved_and_loaded_and_stays_asleep(tmp_path: Path) -> None:
    """Colocated offload puts the trainer to sleep for the rollout, when the loop saves: the save
    and the load wake it for the call and put it back to sleep."""
    trainer = checkpoint_trainer()
    trainer.train_step(checkpoint_batch(1))
    want = trainer_params(trainer)
    trainer.sleep()
    save_checkpoint(tmp_path, trainer, 1)
    assert trainer.asleep
    fresh = checkpoint_trainer(seed=7)
    fresh.sleep()
    load_checkpoint(tmp_path, fresh)
    assert fresh.asleep and fresh.step == 1
    fresh.wake_up()
    assert_bitwise(trainer_params(fresh), want)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = checkpoint_trainer()
    trainer.train_step(checkpoint_batch(1))
    save_checkpoint(tmp_path, trainer, 1, {"pos": 1})
    saved = trainer_params(trainer)
    trainer.train_step(checkpoint_batch(2))

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated crash mid-save")

    monkeypatch.setattr(ckpt, "_write_meta", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, trainer, 2, {"pos": 2})
    assert latest_step(tmp_path) == 1 and not (tmp_path / "iter_0000002").exists()
    fresh = checkpoint_trainer(seed=3)
    assert load_checkpoint(tmp_path, fresh) == {"pos": 1}
    assert_bitwise(trainer_params(fresh), saved)

    monkeypatch.undo()  # the next save cleans the crashed one's leftovers
    save_checkpoint(tmp_path, trainer, 2, {"pos": 2})
    assert latest_step(tmp_path) == 2 and not (tmp_path / ".iter_0000002.tmp").exists()
    assert load_checkpoint(tmp_path / "iter_0000001", fresh) == {"pos": 1}  # older one still there


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    trainer = checkpoint_trainer()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", trainer)
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        load_checkpoint(tmp_path, trainer)
    save_checkpoint(tmp_path, trainer, 5, {})
    with pytest.raises(CheckpointError, match="iter_0000006 is missing"):
        load_checkpoint(tmp_path, trainer, step=6)
    other = Trainer(make_model("qwen3_moe"), *sections(**CHECKPOINT_CONFIG))
    with pytest.raises(CheckpointError, match=r"another architecture \(LlamaForCausalLM\).*mlp"):
        load_checkpoint(tmp_path, other)


def test_export_hf_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    trainer = checkpoint_trainer()
    trainer.train_step(checkpoint_batch(1))
    save_checkpoint(tmp_path / "ckpt", trainer, 1, {})
    out = export_hf(tmp_path / "ckpt", trainer.model.spec, tmp_path / "hf", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf_state = hf.state_dict()
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(hf_state[name], p), name
    ids = torch.tensor([[1, 5, 9, 17, 3]])
    want = trainer.model.forward_packed(ids[0], torch.tensor([0, 5], dtype=torch.int32))
    torch.testing.assert_close(hf(ids).logits[0], want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Two FSDP2 ranks (gloo): save on 2 ranks, load on 2 ranks, identical next step
# --------------------------------------------------------------------------------------------

WORLD = 2


@exits_cleanly
def _fsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ckpt_dir = Path(out_dir) / "ckpt"
        results = {}
        for phase, seed in (("train", 0), ("resume", 5)):  # a fresh model and trainer for the resume
            model = parallelize(checkpoint_model(seed))
            trainer = Trainer(model, *sections(**CHECKPOINT_CONFIG))
            saved = {}
            if phase == "train":
                for step in (1, 2):
                    trainer.train_step(shard_for_rank(checkpoint_batch(step), rank, WORLD))
                save_checkpoint(ckpt_dir, trainer, 2, {"pos": 2})
                saved = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            else:
                assert load_checkpoint(ckpt_dir, trainer) == {"pos": 2}
            metrics = trainer.train_step(shard_for_rank(checkpoint_batch(3), rank, WORLD))
            params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            results[phase] = {"metrics": metrics, "params": params, "saved": saved}
        if rank == 0:
            torch.save(results, Path(out_dir) / "result.pt")
    finally:
        # Every rank reaches this point before any tears gloo down: a rank that destroys the group
        # while its peer still talks to it dies with SIGABRT (seen in CI).
        dist.barrier()
        dist.destroy_process_group()


def test_fsdp2_two_ranks_save_load_identical_next_step(tmp_path: Path) -> None:
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "result.pt")
    want, got = results["train"], results["resume"]
    for k, v in want["metrics"].items():
        assert torch.equal(torch.tensor(got["metrics"][k]), torch.tensor(v)), k
    assert_bitwise(got["params"], want["params"])
    # A single process reassembles the 2-rank shards for the HF export.
    spec = checkpoint_model().spec
    out = export_hf(tmp_path / "ckpt", spec, tmp_path / "hf", dtype="float32")
    from safetensors.torch import load_file

    exported = load_file(str(out / "model.safetensors"))
    for name, t in exported.items():
        assert torch.equal(t, want["saved"][name]), name

"""``rl_step`` over two gloo ranks (what the Ray trainer actors run) equals one process on the
same groups: the shares' old/ref log-probs gathered back into batch order, advantages on the
global batch, each mini-batch split over the ranks."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miles.buffer.batching import build_train_batch
from miles.config import parse_train_args
from miles.train.rl_step import gather_tokens, partition, token_index
from miles.types import Group, Sample, SampleStatus
from tests.orchestrate.helpers import train_argv
from tests.spawn import exits_cleanly

FLAGS = ("--use-kl-loss", "--kl-loss-coef", "0.5", "--use-tis", "--rollout-batch-size", "3",
         "--n-samples-per-prompt", "3", "--global-batch-size", "3", "--num-rollout", "1")  # fmt: skip


def _groups(vocab: int) -> list[Group]:
    rng = random.Random(0)
    groups, index = [], 0
    for g in range(3):
        samples = []
        for _ in range(3):
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(2, 6))]
            response = [rng.randrange(vocab) for _ in range(rng.randint(1, 7))]
            samples.append(Sample(prompt_ids=prompt, response_ids=response, index=index, group_index=g,
                                  rollout_logprobs=[-rng.random() for _ in response],
                                  reward=float(rng.random() > 0.5), status=SampleStatus.COMPLETED))  # fmt: skip
            index += 1
        groups.append(Group(g, tuple(samples)))
    return groups


@exits_cleanly
def _run(rank: int, world: int, init_file: str, model: str, out: str) -> None:
    from miles.orchestrate.build import build_trainer
    from miles.train.rl_step import rl_step

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = parse_train_args(train_argv(Path(model).parent, Path(out) / "run", *FLAGS)[1:])
    trainer = build_trainer(config, torch.device("cpu"), fsdp=True)
    groups = _groups(trainer.model.spec.vocab_size)
    metrics = rl_step(trainer, build_train_batch(groups), group_size=len(groups[0]), step=0)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in trainer.model.named_parameters()}  # fmt: skip
    if rank == 0:
        torch.save({"metrics": metrics, "params": full}, f"{out}/result_{world}.pt")


def _spawn(world: int, tmp: Path, model: str) -> dict[str, Any]:
    init = tmp / f"init_{world}"
    mp.spawn(_run, args=(world, str(init), model, str(tmp)), nprocs=world, join=True)
    return torch.load(tmp / f"result_{world}.pt", weights_only=False)


@pytest.mark.parametrize("world", [2])
def test_two_ranks_equal_one(arith_world, tmp_path, world):
    model = str(arith_world / "model")
    one, two = _spawn(1, tmp_path, model), _spawn(world, tmp_path, model)
    for key in ("train/loss", "train/pg_loss", "train/kl_loss", "train/grad_norm", "train/mismatch_k3_kl"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-7), key
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, rtol=0, atol=1e-6, msg=name)


def test_gather_tokens_restores_batch_order():
    """Single process: the partition covers every sequence once and gathering a one-rank share is
    the identity (the multi-rank gather is exercised by the test above)."""
    batch = build_train_batch(_groups(20))
    parts = partition(batch, 2)
    assert sorted(i for p in parts for i in p) == list(range(batch.num_sequences))
    idx = torch.cat([token_index(batch, p) for p in parts])
    assert sorted(idx.tolist()) == list(range(batch.num_tokens))
    local = torch.arange(batch.num_tokens, dtype=torch.float32)
    assert torch.equal(gather_tokens(local, batch, partition(batch, 1)), local)

"""RolloutManager against a real engine (in-process client), real dataset and real rewards."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from miles.config import parse_train_args
from miles.engine.async_engine import AsyncEngine
from miles.engine.client import LocalEngineClient
from miles.engine.engine import Engine
from miles.models.loading import load_model, load_tokenizer
from miles.rollout.dataset import PromptDataset
from miles.rollout.manager import RolloutManager
from miles.types import SampleStatus


@pytest.fixture
def world(arith_world):
    model_dir = arith_world / "model"
    tok = load_tokenizer(model_dir)
    engine = AsyncEngine(Engine(load_model(model_dir), tok, num_blocks=256, block_size=8)).start()
    yield arith_world, tok, engine
    engine.close()


def _config(world_dir, *extra):
    cfg = parse_train_args(
        ["--hf-checkpoint", str(world_dir / "model"), "--prompt-data", str(world_dir / "train.jsonl"),
         "--input-key", "prompt", "--label-key", "label", "--apply-chat-template", "--rm-type", "exact",
         "--rollout-batch-size", "4", "--n-samples-per-prompt", "3", "--num-rollout", "2",
         "--rollout-max-response-len", "4", *extra]
    )  # fmt: skip
    return cfg.rollout


def _manager(world, cfg, **kw):
    _, tok, engine = world
    dataset = PromptDataset.from_config(cfg, tok)
    return RolloutManager(cfg, dataset, LocalEngineClient(engine), stop_token_ids=[tok.eos_token_id], **kw)


def test_rollout_returns_scored_groups_with_logprobs(world):
    cfg = _config(world[0])
    result = asyncio.run(_manager(world, cfg).generate_rollout(step=0))
    assert len(result.groups) == 4 and all(len(g) == 3 for g in result.groups)
    for g in result.groups:
        assert len({s.group_index for s in g.samples}) == 1
        for s in g.samples:
            assert s.status in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED)
            assert s.reward in (0.0, 1.0) and len(s.rollout_logprobs) == s.response_len >= 1
            assert s.weight_versions == ["0"]
    assert result.metrics["rollout/num_samples"] == 12 and result.metrics["rollout/failed_samples"] == 0


def test_same_step_same_rollout(world):
    cfg = _config(world[0])
    a = asyncio.run(_manager(world, cfg).generate_rollout(step=3))
    b = asyncio.run(_manager(world, cfg).generate_rollout(step=3))
    assert [s.response_ids for g in a.groups for s in g.samples] == [
        s.response_ids for g in b.groups for s in g.samples
    ]


async def _raising_rm(args, sample):
    if sample.index % 2:
        raise ValueError("judge unavailable")
    return 1.0


def test_raising_reward_marks_failed_and_run_goes_on(world, monkeypatch):
    monkeypatch.setattr("tests.rollout.test_manager._raising_rm", _raising_rm)
    cfg = dataclasses.replace(
        _config(world[0]), rm_type=None, custom_rm_path="tests.rollout.test_manager._raising_rm"
    )
    result = asyncio.run(_manager(world, cfg).generate_rollout(step=0))
    failed = [s for g in result.groups for s in g.samples if s.status == SampleStatus.FAILED]
    assert len(failed) == 6 and all(s.error == "ValueError: judge unavailable" for s in failed)
    assert result.metrics["rollout/failed_samples"] == 6


class _DownClient:
    async def generate(self, payload):
        raise ConnectionError("engine down")


def test_engine_failure_marks_samples_failed(world):
    world_dir, tok, _ = world
    cfg = _config(world_dir)
    manager = RolloutManager(cfg, PromptDataset.from_config(cfg, tok), _DownClient())
    result = asyncio.run(manager.generate_rollout(step=0))
    assert all(s.status == SampleStatus.FAILED for g in result.groups for s in g.samples)
    assert manager.failures.counts == {"ConnectionError: engine down": 12}


def test_dynamic_filter_oversamples_until_enough_groups(world):
    cfg = _config(
        world[0],
        "--dynamic-sampling-filter-path",
        "check_reward_nonzero_std",
        "--over-sampling-batch-size",
        "8",
    )
    manager = _manager(world, cfg)
    result = asyncio.run(manager.generate_rollout(step=0))
    # A random model rarely gets sums right: groups without spread are dropped and counted.
    dropped = sum(v for k, v in result.metrics.items() if k.startswith("rollout/dynamic_filter/drop_"))
    assert result.metrics["rollout/num_prompts_drawn"] >= len(result.groups) + dropped
    for g in result.groups:
        assert len({s.reward for s in g.samples}) > 1


def test_evaluate_covers_every_prompt(world):
    world_dir, tok, _ = world
    cfg = _config(world_dir)
    manager = _manager(world, cfg)
    eval_cfg = dataclasses.replace(cfg, prompt_data=str(world_dir / "eval.jsonl"))
    metrics = asyncio.run(manager.evaluate("arith", PromptDataset.from_config(eval_cfg, tok), step=0))
    assert metrics["eval/arith/num_samples"] == 8 and 0.0 <= metrics["eval/arith"] <= 1.0


def test_response_text_has_no_stop_token(world):
    """Regression: the rollout text kept '<eos>', so exact-match rewards were 0 for right answers."""
    result = asyncio.run(_manager(world, _config(world[0])).generate_rollout(step=0))
    for g in result.groups:
        for s in g.samples:
            assert "<eos>" not in s.response

"""RolloutManager against a real engine (in-process client), real dataset and real rewards."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from miles.config import EngineConfig, parse_train_args
from miles.engine.async_engine import AsyncEngine
from miles.engine.client import LocalEngineClient
from miles.engine.engine import Engine
from miles.models.loading import load_model, load_tokenizer
from miles.rollout.dataset import PromptDataset
from miles.rollout.manager import RolloutError, RolloutManager
from miles.types import SampleStatus


@pytest.fixture
def world(arith_world):
    model_dir = arith_world / "model"
    tok = load_tokenizer(model_dir)
    engine = AsyncEngine(
        Engine(load_model(model_dir), tok, EngineConfig(page_size=8), num_blocks=256)
    ).start()
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


def test_sample_numbering_resumes_from_its_state(world):
    """A checkpoint's ``sample_index`` continues the numbering; a malformed one changes nothing."""
    cfg = _config(world[0])
    first = _manager(world, cfg)
    asyncio.run(first.generate_rollout(step=0))
    state = first.state_dict()
    assert state == {"sample_index": 12}
    resumed = _manager(world, cfg)
    for bad in (
        {},
        {"sample_index": -1},
        {"sample_index": "12"},
        {"sample_index": 1.5},
        {"sample_index": True},
    ):
        with pytest.raises(ValueError, match="sample_index"):
            resumed.load_state_dict(bad)
        assert resumed.state_dict() == {"sample_index": 0}
    resumed.load_state_dict(state)
    result = asyncio.run(resumed.generate_rollout(step=1))
    assert min(s.index for g in result.groups for s in g.samples) == 12


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


class _SwitchClient:
    """The real in-process engine behind a switch: while ``down``, every request fails."""

    def __init__(self, inner) -> None:
        self.inner, self.down = inner, False

    async def generate(self, payload):
        if self.down:
            raise ConnectionError("engine down")
        return await self.inner.generate(payload)


def test_consecutive_all_failed_steps_stop_the_rollout(world):
    """Regression: a run in which every sample failed went on (and exited 0 with loss 0)."""
    world_dir, tok, engine = world
    cfg = dataclasses.replace(_config(world_dir), max_failed_rollouts=2)
    client = _SwitchClient(LocalEngineClient(engine))
    manager = RolloutManager(
        cfg, PromptDataset.from_config(cfg, tok), client, stop_token_ids=[tok.eos_token_id]
    )
    eval_cfg = dataclasses.replace(cfg, prompt_data=str(world_dir / "eval.jsonl"))
    eval_set = PromptDataset.from_config(eval_cfg, tok)
    client.down = True
    asyncio.run(manager.generate_rollout(step=0))  # one all-failed step: the run goes on
    assert manager.failed_steps == 1
    asyncio.run(manager.evaluate("arith", eval_set, step=1))  # evaluation never counts
    assert manager.failed_steps == 1
    client.down = False
    asyncio.run(manager.generate_rollout(step=1))  # a step with a good sample resets the count
    assert manager.failed_steps == 0
    client.down = True
    asyncio.run(manager.generate_rollout(step=2))
    with pytest.raises(RolloutError) as e:
        asyncio.run(manager.generate_rollout(step=3))
    assert isinstance(e.value, RuntimeError)
    assert str(e.value) == (
        "every sample failed in 2 consecutive rollout steps (up to step 3; --max-failed-rollouts 2); "
        "most frequent errors:\n  24x ConnectionError: engine down"
    )


async def _hanging_rm(args, sample):
    if sample.index % 3 == 0:
        return 1.0
    await asyncio.Event().wait()


async def _always_hanging_rm(args, sample):
    await asyncio.Event().wait()


def test_hanging_reward_times_out_and_is_reported(world, caplog):
    """Regression: a custom reward that never returned hung the rollout forever, silently."""
    cfg = dataclasses.replace(
        _config(world[0]),
        rm_type=None,
        custom_rm_path="tests.rollout.test_manager._hanging_rm",
        reward_timeout=0.6,
        max_failed_rollouts=1,
    )
    manager = _manager(world, cfg, reward_stall_log_s=0.2)
    with caplog.at_level(logging.WARNING, logger="miles.rollout.manager"):
        result = asyncio.run(asyncio.wait_for(manager.generate_rollout(step=0), 30))
    samples = [s for g in result.groups for s in g.samples]
    failed = [s for s in samples if s.status == SampleStatus.FAILED]
    assert len(failed) == 8 and result.metrics["rollout/failed_samples"] == 8
    assert {s.error for s in failed} == {
        "TimeoutError: reward tests.rollout.test_manager._hanging_rm timed out after 0.6 s (--reward-timeout)"
    }
    stalls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reward stalled")]
    assert stalls and "8 samples waiting on tests.rollout.test_manager._hanging_rm" in stalls[0]
    assert manager.failed_steps == 0  # 4 samples were scored


def test_a_reward_that_always_hangs_stops_the_run(world):
    cfg = dataclasses.replace(
        _config(world[0]),
        rm_type=None,
        custom_rm_path="tests.rollout.test_manager._always_hanging_rm",
        reward_timeout=0.3,
        max_failed_rollouts=1,
    )
    with pytest.raises(RolloutError, match=r"in 1 consecutive rollout steps .*\n  12x TimeoutError: reward "):
        asyncio.run(asyncio.wait_for(_manager(world, cfg).generate_rollout(step=0), 30))


def test_rollout_and_evaluation_show_progress(world, capsys):
    world_dir, tok, _ = world
    cfg = _config(world_dir)
    manager = _manager(world, cfg)
    asyncio.run(manager.generate_rollout(step=3))
    eval_cfg = dataclasses.replace(cfg, prompt_data=str(world_dir / "eval.jsonl"))
    asyncio.run(manager.evaluate("arith", PromptDataset.from_config(eval_cfg, tok), step=0, n_samples=2))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[miles] rollout 3: 0/12 samples")
    assert any(line.startswith("[miles] rollout 3: 12/12 samples") for line in lines)
    assert any(line.startswith("[miles] eval arith: 0/16 samples") for line in lines)
    assert lines[-1].startswith("[miles] eval arith: 16/16 samples")


def test_progress_is_closed_when_the_rollout_fails(world, capsys):
    world_dir, tok, _ = world
    cfg = dataclasses.replace(_config(world_dir), max_failed_rollouts=1)
    manager = RolloutManager(cfg, PromptDataset.from_config(cfg, tok), _DownClient())
    with pytest.raises(RolloutError):
        asyncio.run(manager.generate_rollout(step=0))
    assert capsys.readouterr().err.splitlines()[-1].startswith("[miles] rollout 0: 12/12 samples")

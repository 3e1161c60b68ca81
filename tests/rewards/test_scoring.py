"""score_samples: built-ins, custom hooks (async/sync, group), failures and their log."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import pytest

from miles.config import RolloutConfig
from miles.rewards.scoring import (
    DEFAULT_REWARD_TIMEOUT_S,
    FailureLog,
    RewardWatch,
    resolve_reward,
    score_samples,
)
from miles.types import Sample, SampleStatus


def _samples(responses, label="4", groups=None):
    groups = groups or [0] * len(responses)
    return [
        Sample(response=r, label=label, index=i, group_index=g)
        for i, (r, g) in enumerate(zip(responses, groups))
    ]


def test_builtin_by_name():
    samples = _samples([r"\boxed{4}", r"\boxed{5}"])
    asyncio.run(score_samples(samples, "math"))
    assert [s.reward for s in samples] == [1.0, 0.0]


def test_metadata_rm_type_overrides_per_sample():
    samples = _samples(["4", "4"])
    samples[1].metadata["rm_type"] = "exact"
    asyncio.run(score_samples(samples, "deepscaler"))
    assert [s.reward for s in samples] == [0.0, 1.0]


def test_async_and_sync_custom_functions():
    async def arm(args, sample):
        await asyncio.sleep(0)
        return len(sample.response) * args.scale

    def srm(args, sample):
        return True

    args = SimpleNamespace(scale=0.5)
    samples = _samples(["ab", "abcd"])
    asyncio.run(score_samples(samples, arm, args=args))
    assert [s.reward for s in samples] == [1.0, 2.0]
    asyncio.run(score_samples(samples, srm, args=args))
    assert [s.reward for s in samples] == [1.0, 1.0]


def test_raising_reward_marks_failed_and_logs_once_per_message(caplog):
    def rm(args, sample):
        if sample.response == "boom":
            raise ValueError("judge crashed")
        if sample.response == "bad":
            return "high"
        return 1.0

    samples = _samples(["ok", "boom", "boom", "bad", "boom"])
    log = FailureLog()
    with caplog.at_level(logging.WARNING, logger="miles.rewards.scoring"):
        asyncio.run(score_samples(samples, rm, failures=log))
        asyncio.run(score_samples(_samples(["boom"]), rm, failures=log))  # seen: not logged again
    assert samples[0].reward == 1.0 and samples[0].status == SampleStatus.PENDING
    for s in samples[1:]:
        assert s.status == SampleStatus.FAILED and s.reward is None
    assert samples[1].error == "ValueError: judge crashed"
    assert samples[3].error == "TypeError: reward must be a finite number, got 'high'"
    assert log.counts == {
        "ValueError: judge crashed": 4,
        "TypeError: reward must be a finite number, got 'high'": 1,
    }
    assert log.metrics() == {"rollout/failed_samples": 5.0}
    assert log.summary().splitlines()[0] == "4x ValueError: judge crashed"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert all("rollout/failed_samples" in w for w in warnings)


def test_failed_and_aborted_samples_are_not_scored():
    calls = []

    def rm(args, sample):
        calls.append(sample.index)
        return 1.0

    samples = _samples(["a", "b", "c"])
    samples[0].status = SampleStatus.FAILED
    samples[1].status = SampleStatus.ABORTED
    asyncio.run(score_samples(samples, rm))
    assert calls == [2]


def test_group_rm():
    async def grm(args, samples):
        return [float(i) for i in range(len(samples))]

    samples = _samples(["a", "b", "c", "d", "e"], groups=[0, 0, 1, 1, 1])
    asyncio.run(score_samples(samples, grm, group_rm=True))
    assert [s.reward for s in samples] == [0.0, 1.0, 0.0, 1.0, 2.0]


def test_group_rm_wrong_length_fails_the_group():
    def grm(args, samples):
        return [1.0] if samples[0].group_index == 0 else [1.0] * len(samples)

    samples = _samples(["a", "b", "c"], groups=[0, 0, 1])
    log = FailureLog()
    asyncio.run(score_samples(samples, grm, group_rm=True, failures=log))
    assert [s.status for s in samples[:2]] == [SampleStatus.FAILED] * 2
    assert samples[2].reward == 1.0
    assert "one reward per sample (2), got 1 values" in samples[0].error
    assert log.total == 2


def test_dict_reward_needs_reward_key():
    def rm(args, sample):
        return {"score": -1.0, "acc": False}

    samples = _samples(["x"])
    asyncio.run(score_samples(samples, rm, args=SimpleNamespace(reward_key="score")))
    assert samples[0].reward == -1.0
    assert samples[0].metadata["reward_details"] == {"score": -1.0, "acc": False}
    samples = _samples(["x"])
    asyncio.run(score_samples(samples, rm, args=SimpleNamespace(reward_key=None)))
    assert samples[0].status == SampleStatus.FAILED
    assert "set --reward-key" in samples[0].error


def test_unknown_rm_type_fails_samples_with_suggestion():
    samples = _samples(["x"])
    asyncio.run(score_samples(samples, "mathh"))
    assert "did you mean math?" in samples[0].error


def test_resolve_reward():
    assert resolve_reward("countdown", None) == "countdown"
    fn = resolve_reward("math", "miles.rewards.math.rm_math")
    assert callable(fn) and fn.__name__ == "rm_math"
    with pytest.raises(ValueError, match="unknown rm_type 'mth'"):
        resolve_reward("mth", None)
    with pytest.raises(ValueError, match="--rm-type"):
        resolve_reward(None, None)


def _run(coro, limit_s: float = 10.0):
    """Run ``coro``, failing the test (instead of hanging it) if it takes past ``limit_s``."""
    return asyncio.run(asyncio.wait_for(coro, limit_s))


async def hang_forever(args, sample):
    await asyncio.Event().wait()


def test_hanging_async_reward_times_out_after_reward_timeout():
    """Regression: a custom reward that never returned hung the run forever."""

    async def rm(args, sample):
        if sample.response == "hang":
            await asyncio.Event().wait()
        return 1.0

    samples = _samples(["ok", "hang", "ok"])
    log = FailureLog()
    _run(score_samples(samples, rm, args=SimpleNamespace(reward_timeout=0.2), failures=log))
    assert [s.reward for s in samples] == [1.0, None, 1.0]
    assert samples[1].status == SampleStatus.FAILED
    name = "tests.rewards.test_scoring.test_hanging_async_reward_times_out_after_reward_timeout.<locals>.rm"
    assert samples[1].error == f"TimeoutError: reward {name} timed out after 0.2 s (--reward-timeout)"
    assert log.total == 1


def test_coroutine_swallowing_its_cancellation_still_times_out():
    release = asyncio.Event()

    async def stubborn(args, sample):
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # a badly written hook: keeps waiting
                await release.wait()
        return 1.0

    async def main():
        samples = _samples(["x"])
        task = asyncio.ensure_future(score_samples(samples, stubborn, timeout_s=0.2))
        done, _ = await asyncio.wait({task}, timeout=10)
        release.set()  # let the hook end, so that the loop can close (and the unfixed code fail)
        await task
        return done, samples

    done, [sample] = asyncio.run(main())
    assert done, "score_samples waited for a hook that ignores its cancellation"
    assert sample.status == SampleStatus.FAILED and "timed out after 0.2 s" in sample.error


def test_blocking_sync_reward_runs_off_the_event_loop_and_times_out():
    """Regression: a plain def that blocked held the event loop, so nothing could time it out."""
    unblock = threading.Event()

    def blocking(args, sample):
        if sample.response == "block":
            unblock.wait(5)  # bounded only so that the unfixed code fails instead of hanging
            return 1.0
        return 0.5

    samples = _samples(["block", "quick"])
    try:
        _run(score_samples(samples, blocking, timeout_s=0.2))
    finally:
        unblock.set()
    assert samples[0].status == SampleStatus.FAILED and "timed out after 0.2 s" in samples[0].error
    assert samples[1].reward == 0.5


def test_a_reward_thread_that_never_returns_does_not_keep_the_process_alive():
    code = textwrap.dedent(
        """
        import asyncio, threading
        from miles.rewards.scoring import score_samples
        from miles.types import Sample

        def rm(args, sample):
            threading.Event().wait()  # never returns

        samples = [Sample(response="x")]
        asyncio.run(score_samples(samples, rm, timeout_s=0.2))
        print(samples[0].status.value, samples[0].error)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("failed TimeoutError: reward __main__.rm timed out after 0.2 s")


def test_hanging_group_reward_fails_its_group():
    async def grm(args, samples):
        if samples[0].group_index == 1:
            await asyncio.Event().wait()
        return [1.0] * len(samples)

    samples = _samples(["a", "b", "c"], groups=[0, 1, 1])
    _run(score_samples(samples, grm, group_rm=True, timeout_s=0.2))
    assert samples[0].reward == 1.0
    assert [s.status for s in samples[1:]] == [SampleStatus.FAILED] * 2
    assert all("timed out after 0.2 s" in s.error for s in samples[1:])


def test_stalled_reward_is_logged_with_count_name_and_wait(caplog):
    """Regression: a stalled reward was silent for the whole of its wait."""
    samples = _samples(["a", "b", "c"])
    watch = RewardWatch(interval_s=0.1)
    with caplog.at_level(logging.WARNING, logger="miles.rewards.scoring"):
        _run(score_samples(samples, hang_forever, timeout_s=0.5, watch=watch))
    stalls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reward stalled")]
    assert stalls, [r.getMessage() for r in caplog.records]
    # Under load the first line may come before every call has started: one line names all three.
    assert any(
        re.fullmatch(
            r"reward stalled: 3 samples waiting on tests\.rewards\.test_scoring\.hang_forever "
            r"for up to 0\.\d s \(timeout 0\.5 s\)",
            line,
        )
        for line in stalls
    ), stalls
    assert len(stalls) <= 5  # one line per interval, not one per sample
    assert all(s.status == SampleStatus.FAILED for s in samples)


def test_concurrent_scorers_sharing_a_watch_log_one_line_per_interval(caplog):
    watch = RewardWatch(interval_s=0.2)

    async def main():
        async with watch.watching():
            await asyncio.gather(
                *(
                    score_samples(_samples(["a", "b"]), hang_forever, timeout_s=0.5, watch=watch)
                    for _ in range(4)
                )
            )

    with caplog.at_level(logging.WARNING, logger="miles.rewards.scoring"):
        _run(main())
    stalls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reward stalled")]
    assert stalls and "8 samples waiting on" in stalls[0]
    assert len(stalls) <= 3


def test_watch_reports_only_calls_older_than_its_interval():
    now = [0.0]
    watch = RewardWatch(interval_s=30.0, clock=lambda: now[0])
    a = watch.begin("my_rm.score", 1, 600.0)
    now[0] = 20.0
    watch.begin("my_rm.score", 1, 600.0)
    watch.begin("remote_rm", 8, 600.0)
    assert watch.stalled() is None  # nothing has waited 30 s yet
    now[0] = 45.0
    assert (
        watch.stalled() == "reward stalled: 1 sample waiting on my_rm.score for up to 45.0 s (timeout 600 s)"
    )
    now[0] = 95.0
    assert watch.stalled() == (
        "reward stalled: 8 samples waiting on remote_rm for up to 1 min 15 s (timeout 600 s); "
        "2 samples waiting on my_rm.score for up to 1 min 35 s (timeout 600 s)"
    )
    watch.end(a)
    assert "1 sample waiting on my_rm.score for up to 1 min 15 s" in (watch.stalled() or "")


def test_default_timeout_matches_the_flag():
    defaults = {f.name: f.default for f in dataclasses.fields(RolloutConfig)}
    assert defaults["reward_timeout"] == DEFAULT_REWARD_TIMEOUT_S

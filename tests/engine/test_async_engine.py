"""``AsyncEngine`` admission: submissions made in one pass of the event loop reach the engine as
one command, so a rollout's requests are prefilled together; a full engine refuses more."""

from __future__ import annotations

import asyncio
import threading

import pytest

from miles.engine.async_engine import AsyncEngine, EngineOverloaded, RequestSpec
from miles.models.loading import load_model
from miles.types import SamplingParams
from tests.engine.conftest import make_engine
from tests.engine.helpers import CharTokenizer
from tests.models.conftest import save_case


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(save_case("llama", tmp_path_factory.mktemp("async_llama")))


def _hold(engine: AsyncEngine) -> tuple[threading.Event, threading.Event]:
    """Block the engine thread inside a command until the returned ``release`` is set."""
    held, release = threading.Event(), threading.Event()

    def block() -> None:
        held.set()
        release.wait(30)

    engine._commands.put(block)
    assert held.wait(30)
    return held, release


def _recording_prefills(llama, n: int, prefill_batches: list[int]):
    """An engine for ``n`` running requests whose runner appends each prefill batch's size to
    ``prefill_batches``."""
    core = make_engine(llama, CharTokenizer(), num_blocks=128, page_size=4, max_running_requests=n)
    run = core.runner.run

    def recording_run(batch, pending=None):
        if any(item.num_tokens > 1 for item in batch):
            prefill_batches.append(len(batch))
        return run(batch, pending)

    core.runner.run = recording_run  # type: ignore[method-assign]
    return core


def test_generate_calls_of_one_loop_pass_are_one_command_and_one_prefill(llama):
    n = 12
    prefill_batches: list[int] = []

    async def main() -> None:
        engine = AsyncEngine(_recording_prefills(llama, n, prefill_batches)).start()
        try:
            _, release = _hold(engine)
            params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
            tasks = [
                asyncio.ensure_future(engine.generate([RequestSpec([1, 2, 3, i], params, f"r{i}")]))
                for i in range(n)
            ]
            for _ in range(3):  # the tasks run their submissions, then the flush
                await asyncio.sleep(0)
            # Twelve submissions, one command (one per submission before: the engine thread took
            # whatever had arrived each time it won the GIL, and prefilled those few).
            assert engine._commands.qsize() == 1
            release.set()
            outs = await asyncio.gather(*tasks)
            assert [len(o[0].output_ids) for o in outs] == [4] * n
        finally:
            engine.close()

    asyncio.run(main())
    assert prefill_batches == [n]  # all twelve prompts in one prefill step


def test_rollout_payloads_through_the_local_client_are_one_admission(llama):
    """Regression: parsing every /generate body on the preparation thread made each of a rollout's
    requests reach the engine whenever the thread finished it, so the engine's batches (and in
    the default mode its log-prob bits) depended on timing; a resumed run no longer repeated the
    next step. Small pre-tokenized bodies are parsed inline, in the loop pass that made them."""
    from miles.engine.client import LocalEngineClient

    n = 12
    prefill_batches: list[int] = []

    async def main() -> None:
        engine = AsyncEngine(_recording_prefills(llama, n, prefill_batches)).start()
        client = LocalEngineClient(engine)
        try:
            _, release = _hold(engine)
            params = {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True}
            tasks = [
                asyncio.ensure_future(client.generate({"input_ids": [1, 2, 3, i], "sampling_params": params}))
                for i in range(n)
            ]
            for _ in range(10):
                await asyncio.sleep(0)
            assert engine._commands.qsize() == 1
            release.set()
            await asyncio.gather(*tasks)
        finally:
            engine.close()

    asyncio.run(main())
    assert prefill_batches == [n]


def test_submissions_in_separate_passes_still_all_complete(llama):
    async def main() -> None:
        engine = AsyncEngine(make_engine(llama, CharTokenizer(), num_blocks=128, page_size=4)).start()
        try:
            params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
            results = []
            for i in range(3):
                results.append(await engine.generate([RequestSpec([4, 5, i], params, f"s{i}")]))
                await asyncio.sleep(0)
            assert [len(r[0].output_ids) for r in results] == [3, 3, 3]
        finally:
            engine.close()

    asyncio.run(main())


def test_a_submission_flushed_after_close_fails_instead_of_hanging(llama):
    async def main() -> None:
        engine = AsyncEngine(make_engine(llama, CharTokenizer(), num_blocks=128, page_size=4)).start()
        params = SamplingParams(temperature=0.0, max_new_tokens=3)
        task = asyncio.ensure_future(engine.generate([RequestSpec([1, 2], params, "late")]))
        await asyncio.sleep(0)  # the task has queued its submission; the flush is scheduled
        engine.close()
        with pytest.raises(RuntimeError, match="shut down"):
            await asyncio.wait_for(task, 30)

    asyncio.run(main())


def test_a_rejected_submission_does_not_take_its_batchmates_down(llama):
    async def main() -> None:
        engine = AsyncEngine(make_engine(llama, CharTokenizer(), num_blocks=128, page_size=4)).start()
        try:
            params = SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True)
            good = asyncio.ensure_future(engine.generate([RequestSpec([1, 2], params, "good")]))
            bad = asyncio.ensure_future(engine.generate([RequestSpec([], params, "bad")]))  # empty prompt
            with pytest.raises(ValueError):
                await bad
            (out,) = await good
            assert len(out.output_ids) == 2
        finally:
            engine.close()

    asyncio.run(main())


def test_a_full_engine_refuses_more_and_every_end_frees_a_slot(llama):
    """``max_queued_requests``: past running + queued, ``submit`` raises ``EngineOverloaded`` and
    adds nothing; finished, aborted and refused requests all give their slot back."""

    async def until_empty(engine: AsyncEngine) -> None:
        for _ in range(3000):
            if engine.num_unfinished == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{engine.num_unfinished} requests still counted as unfinished")

    async def main() -> None:
        core = make_engine(
            llama, CharTokenizer(), num_blocks=128, page_size=4, max_running_requests=2, max_queued_requests=1
        )
        engine = AsyncEngine(core).start()  # 3 unfinished at most
        try:
            _, release = _hold(engine)
            params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
            tasks = [
                asyncio.ensure_future(engine.generate([RequestSpec([1, 2, i], params, f"r{i}")]))
                for i in range(3)
            ]
            await asyncio.sleep(0)  # the three are admitted
            with pytest.raises(EngineOverloaded, match="full"):
                await engine.generate([RequestSpec([1], params, "extra")])
            release.set()
            assert [len(o[0].output_ids) for o in await asyncio.gather(*tasks)] == [3, 3, 3]
            await until_empty(engine)
            long = SamplingParams(temperature=0.0, max_new_tokens=50, ignore_eos=True)
            stream = await engine.submit([RequestSpec([1, 2], long, "aborted")])
            stream.close()
            with pytest.raises(ValueError):
                await engine.submit([RequestSpec([], long, "refused")])  # an empty prompt
            await until_empty(engine)
            outs = await engine.generate([RequestSpec([4, i], params, f"s{i}") for i in range(3)])
            assert [len(o.output_ids) for o in outs] == [3, 3, 3]
        finally:
            engine.close()

    asyncio.run(main())

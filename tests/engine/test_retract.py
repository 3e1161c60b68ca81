"""``pause_generation("retract")`` and the exactness of a weight update in the middle of a batch.

Retract moves every running request back to ``waiting`` and frees its KV blocks; on
``continue_generation`` its prompt and output so far are prefilled again and it finishes
normally. With the batch-invariant kernels a prefill computes every token's K/V and logits to
the bit as the decode steps did, so pausing (in place or by retract), pushing the *same* weights
through a real update and continuing gives the uninterrupted run's tokens and log-probs exactly,
while the per-token weight versions show the update at the tokens sampled after it."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from miles.engine.async_engine import AsyncEngine
from miles.engine.engine import Engine
from miles.engine.model_runner import ModelRunner
from miles.engine.request import RequestOutput, RequestStatus
from miles.engine.server import ServerConfig, create_app
from miles.engine.tensor_wire import encode_safetensors
from miles.kernels.batch_invariant import set_batch_invariant
from miles.models.generation import generate_ids
from miles.models.loading import load_model
from miles.types import SamplingParams
from tests.engine.conftest import ThreadServer, make_engine
from tests.engine.helpers import CharTokenizer, random_prompts, run_to_end, same_weights

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture
def invariant():
    """The batch-invariant kernels, process-wide, for one test (switched off after it)."""
    set_batch_invariant(True)
    try:
        yield
    finally:
        set_batch_invariant(False)


def _engine(model, **kw) -> Engine:
    kw = {"num_blocks": 64, "page_size": 4, "eos_token_ids": [93, 47], "random_seed": 0, **kw}
    return make_engine(model, CharTokenizer(), **kw)


# ---- retract -----------------------------------------------------------------------------------


def test_retract_frees_every_block_and_the_requests_finish_normally(llama):
    prompts = random_prompts(6, 9, 3, 11, 7, seed=4)
    engine = _engine(llama, max_running_requests=3)
    rids = [engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(5):
        engine.step()
    running = [r.request_id for r in engine.scheduler.running]
    waiting = [r.request_id for r in engine.scheduler.waiting]
    assert len(running) == 3 and waiting
    sampled = {r: list(engine._requests[r].output_ids) for r in rids}
    engine.pause_generation("retract")
    assert engine.is_paused
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, len(rids))
    assert engine.allocator.num_used_blocks == 0 and stats.num_preemptions == 0
    # Back in front of those that were waiting, in the order they ran.
    assert [r.request_id for r in engine.scheduler.waiting] == running + waiting
    for req in engine.scheduler.waiting:
        assert req.status == RequestStatus.WAITING and not req.block_table and req.num_computed_tokens == 0
    for _ in range(3):
        assert engine.step() == []  # paused: nothing runs, nothing is lost
    assert {r: list(engine._requests[r].output_ids) for r in rids} == sampled
    engine.continue_generation()
    done = run_to_end(engine)
    assert [list(done[r].output_ids) for r in rids] == generate_ids(llama, prompts, 12)
    assert all(done[r].finish_reason.type == "length" for r in rids)
    assert all(done[r].output_weight_versions == (0,) * 12 for r in rids)
    # No update came: the retracted requests found their own blocks in the prefix cache.
    assert all(done[r].cached_tokens > 0 for r in running)
    assert engine.allocator.num_used_blocks == 0


def test_retract_with_an_overlapped_step_in_flight(llama, invariant):
    """The step in flight is read first: its tokens are appended, then the requests retracted."""
    prompts = random_prompts(5, 6, 7, seed=3)
    serial = _engine(llama).generate(prompts, GREEDY)
    engine = _engine(llama, overlap_schedule=True)
    rids = [engine.add_request(p, GREEDY, stream=False) for p in prompts]
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    appended = {r: len(engine._requests[r].output_ids) for r in rids}
    engine.pause_generation("retract")
    assert engine._inflight is None and engine.allocator.num_used_blocks == 0
    assert {r: len(engine._requests[r].output_ids) for r in rids} == {r: n + 1 for r, n in appended.items()}
    engine.continue_generation()
    done = run_to_end(engine)
    for rid, want in zip(rids, serial):
        assert done[rid].output_ids == want.output_ids
        assert torch.equal(torch.tensor(done[rid].output_logprobs), torch.tensor(want.output_logprobs))


def test_pause_modes_are_checked(llama):
    engine = _engine(llama)
    for bad in ("Retract", "pause", None, 3):
        with pytest.raises(ValueError, match="pause mode must be one of 'abort', 'retract', 'in_place'"):
            engine.pause_generation(bad)  # type: ignore[arg-type]
    assert not engine.is_paused


# ---- exactness across a weight update -----------------------------------------------------------


def _rollout_params(n: int) -> list[SamplingParams]:
    """Seeded temperature-1 rows of different lengths, half of them stopping at EOS."""
    return [
        SamplingParams(
            temperature=1.0, sampling_seed=50 + i, max_new_tokens=6 + (5 * i) % 11, ignore_eos=i % 2 == 0
        )
        for i in range(n)
    ]


PROMPTS = random_prompts(5, 9, 3, 12, 7, 4, 30, seed=7)


def _tensors(outs: list[RequestOutput]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return (
        [torch.tensor(o.output_ids, dtype=torch.long) for o in outs],
        [torch.tensor(o.output_logprobs, dtype=torch.float32) for o in outs],
    )


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_pause_update_continue_gives_the_uninterrupted_run_bit_for_bit(llama, invariant, mode, overlap):
    kw = {"overlap_schedule": overlap, "max_prefill_tokens": 12, "enable_deterministic_inference": True}
    params = _rollout_params(len(PROMPTS))
    uninterrupted = _engine(llama, **kw).generate(PROMPTS, params)

    engine = _engine(llama, **kw)
    # The last prompt comes once the others decode, so that the pause finds it half prefilled
    # (the tokens do not depend on the schedule: batch-invariant kernels, seeded rows).
    rids = [engine.add_request(p, sp, stream=False) for p, sp in zip(PROMPTS[:-1], params)]
    steps = [engine.step() for _ in range(8)]
    rids.append(engine.add_request(PROMPTS[-1], params[-1], stream=False))
    steps += [engine.step() for _ in range(2)]
    done = {o.request_id: o for outs in steps for o in outs if o.finished}
    mid_prefill = [r for r in engine.scheduler.running if 0 < r.num_computed_tokens < len(r.prompt_ids)]
    engine.pause_generation(mode)
    split = {r: len(engine._requests[r].output_ids) for r in rids if r in engine._requests}
    if mode == "retract":
        assert engine.stats().num_running == 0 and engine.allocator.num_used_blocks == 0
    engine.update_weights_from_tensors(same_weights(llama))  # a real update: the version bumps
    assert engine.weight_version == "1"
    engine.continue_generation()
    done.update(run_to_end(engine))
    interrupted = [done[r] for r in rids]

    (ids_a, lps_a), (ids_b, lps_b) = _tensors(uninterrupted), _tensors(interrupted)
    for rid, a, b, la, lb in zip(rids, ids_a, ids_b, lps_a, lps_b):
        assert torch.equal(a, b), rid
        assert torch.equal(la, lb), rid
    assert [o.finish_reason for o in interrupted] == [o.finish_reason for o in uninterrupted]
    # The pause really cut requests: tokens on both sides, and a prompt still being prefilled.
    assert sum(0 < n < len(done[r].output_ids) for r, n in split.items()) >= 3
    assert mid_prefill and all(split[r.request_id] == 0 for r in mid_prefill)
    for rid, out in zip(rids, interrupted):
        n = split.get(rid, len(out.output_ids))  # finished before the pause: all version 0
        assert out.output_weight_versions == (0,) * n + (1,) * (len(out.output_ids) - n), rid


# ---- over HTTP -----------------------------------------------------------------------------------


class _SlowRunner(ModelRunner):
    """The real runner, slowed down so that a request is surely running when the test pauses."""

    def __init__(self, runner: ModelRunner, delay_s: float) -> None:
        super().__init__(runner.model, runner.kv_cache, runner.routing, runner.graphs)
        self.delay_s = delay_s

    def run(self, batch, pending=None):
        time.sleep(self.delay_s)
        return super().run(batch, pending)


def test_pause_generation_route_retracts_and_refuses_bad_modes(llama_dir):
    core = _engine(load_model(llama_dir))
    core.runner = _SlowRunner(core.runner, 0.02)
    engine = AsyncEngine(core).start()
    server = ThreadServer(create_app(engine, ServerConfig(llama_dir))).start()  # type: ignore[arg-type]
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:

            def state() -> dict:
                return http.get("/get_server_info").json()["internal_states"][0]

            for bad in ("Retract", "pause", 3):
                r = http.post("/pause_generation", json={"mode": bad})
                assert r.status_code == 400 and r.json()["error"]["param"] == "mode", r.text
            body = {
                "input_ids": [3, 4, 5, 6, 7],
                "sampling_params": {"temperature": 0.0, "max_new_tokens": 60, "ignore_eos": True},
                "return_logprob": True,
            }
            result: dict = {}
            t = threading.Thread(target=lambda: result.update(r=http.post("/generate", json=body).json()))
            t.start()
            deadline = time.monotonic() + 10
            while state()["num_running"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert http.post("/pause_generation", json={"mode": "retract"}).json()["success"] is True
            s = state()
            assert (s["num_running"], s["num_waiting"], s["kv_usage"]) == (0, 1, 0.0)
            assert t.is_alive()  # retracted, not aborted: it waits for continue
            tensors = encode_safetensors(same_weights(core.model))
            update = http.post("/update_weights_from_tensor", json={"serialized_named_tensors": [tensors]})
            assert update.json()["weight_version"] == "1", update.text
            assert http.post("/continue_generation", json={}).json()["success"] is True
            t.join(30)
        meta = result["r"]["meta_info"]
        assert meta["finish_reason"] == {"type": "length", "length": 60}
        versions = meta["output_token_weight_versions"]
        n = versions.count(0)
        assert 0 < n < 60 and versions == [0] * n + [1] * (60 - n) and meta["weight_version"] == "1"
    finally:
        server.stop()
        engine.close()

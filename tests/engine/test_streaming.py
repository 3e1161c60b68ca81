"""Streamed and non-streamed requests: which outputs ``step()`` returns, and that a request whose
text is decoded only when needed ends with the same text (stop tokens, stop strings, length,
abort) as one decoded every step."""

from __future__ import annotations

import asyncio

import pytest

from miles.engine.async_engine import AsyncEngine, RequestSpec
from miles.engine.engine import Engine
from miles.models.loading import load_model
from miles.types import SamplingParams
from tests.engine.conftest import make_engine
from tests.engine.helpers import CharTokenizer, random_prompts
from tests.models.conftest import save_case


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = save_case("llama", tmp_path_factory.mktemp("stream_llama"))
    return load_model(path)


def _run(engine: Engine, prompts, params, stream: bool):
    ids = [engine.add_request(p, params, stream=stream) for p in prompts]
    seen: dict[str, list] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(out)
    return [seen[i] for i in ids]


@pytest.mark.parametrize("kind", ["length", "stop_token", "stop_token_kept", "stop_string"])
def test_non_streamed_requests_end_with_the_streamed_text(llama, kind):
    prompts = random_prompts(5, 9, 14, 3)
    tok = CharTokenizer()
    base = dict(temperature=0.0, max_new_tokens=9)
    # Stops taken from a first run's outputs, so that some request really meets them.
    first = make_engine(llama, tok, num_blocks=64, page_size=4).generate(
        prompts, SamplingParams(ignore_eos=True, **base)
    )
    token = first[0].output_ids[4]
    params = {
        "length": dict(ignore_eos=True),
        "stop_token": dict(stop_token_ids=(token,)),
        "stop_token_kept": dict(stop_token_ids=(token,), no_stop_trim=True),
        "stop_string": dict(stop=(tok.decode([token]),), min_new_tokens=2),
    }[kind]
    sp = SamplingParams(**base, **params)
    streamed = _run(make_engine(llama, tok, num_blocks=64, page_size=4), prompts, sp, True)
    final_only = _run(make_engine(llama, tok, num_blocks=64, page_size=4), prompts, sp, False)
    assert (kind != "length") == any(f[0].finish_reason.type == "stop" for f in final_only)  # type: ignore[union-attr]
    for s, f in zip(streamed, final_only):
        assert len(f) == 1 and f[0].finished
        assert len(s) == len(s[-1].output_ids) and all(not o.finished for o in s[:-1])  # one per token
        assert (f[0].output_ids, f[0].text, f[0].finish_reason) == (
            s[-1].output_ids,
            s[-1].text,
            s[-1].finish_reason,
        )


def test_an_aborted_non_streamed_request_has_its_text(llama):
    engine = make_engine(llama, CharTokenizer(), num_blocks=64, page_size=4)
    rid = engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=50), stream=False)
    for _ in range(4):
        assert engine.step() == []  # no intermediate outputs
    engine.abort(rid)
    (out,) = engine.step()
    assert out.finish_reason.type == "abort" and len(out.output_ids) == 4  # type: ignore[union-attr]
    assert out.text == CharTokenizer().decode(list(out.output_ids))


def test_async_generate_does_not_stream_but_counts_every_token(llama):
    async def main():
        engine = AsyncEngine(make_engine(llama, CharTokenizer(), num_blocks=64, page_size=4)).start()
        try:
            params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
            specs = [RequestSpec([1, 2, 3 + i], params, f"r{i}") for i in range(3)]
            outs = await engine.generate(specs)
            assert [len(o.output_ids) for o in outs] == [6, 6, 6]
            assert engine.generated_tokens_total == 18
            stream = await engine.submit([RequestSpec([4, 5], params, "s")])
            got = [out async for _, out in stream]
            assert len(got) == 6 and got[-1].finished  # streamed: every token
            assert engine.generated_tokens_total == 24
        finally:
            engine.close()

    asyncio.run(main())

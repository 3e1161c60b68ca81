"""``miles serve --sglang-enable-deterministic-inference``: a real server process in
batch-invariant mode returns the same tokens and log-probs for a request whatever else it is
batched with (alone, or among 12 requests of other lengths)."""

from __future__ import annotations

import httpx

from tests.engine.conftest import start_server


def test_deterministic_server_answers_independently_of_the_batch(tiny_model_dir):
    server = start_server(tiny_model_dir, "--sglang-enable-deterministic-inference").wait()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            target = {"sampling_seed": 11, "temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True}

            def ask(ids, params):
                out = http.post("/generate", json={"input_ids": ids, "sampling_params": params,
                                                   "return_logprob": True}).json()  # fmt: skip
                return out if isinstance(out, list) else [out]

            prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
            (alone,) = ask(prompt, target)
            others = [[3 + (i * 7) % 90] * (2 + (5 * i) % 23) for i in range(12)]
            batch = ask([*others[:6], prompt, *others[6:]],
                        [*[dict(target, sampling_seed=i) for i in range(6)], target,
                         *[dict(target, sampling_seed=i) for i in range(6, 12)]])  # fmt: skip
            mine = batch[6]
            assert mine["output_ids"] == alone["output_ids"]
            lp = [x[0] for x in mine["meta_info"]["output_token_logprobs"]]
            assert lp == [x[0] for x in alone["meta_info"]["output_token_logprobs"]]
    finally:
        server.stop()

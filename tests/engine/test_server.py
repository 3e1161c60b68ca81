"""``miles serve`` over real HTTP (a subprocess): SGLang native endpoints, OpenAI endpoints with
the official client, input errors, control hooks, auth, and abort on client disconnect."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pickle
import re
import threading
import time
from typing import Any

import httpx
import pytest
import torch

from tests.engine.conftest import ThreadServer

GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def http(server_url: str):
    with httpx.Client(base_url=server_url, timeout=60) as client:
        yield client


def _metrics(http: httpx.Client) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        m = re.match(r"sglang:(\w+)\{[^}]*\} (\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _error(r: httpx.Response, field: str | None) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if field is not None:
        assert err["param"] == field and field in err["message"], err
    return str(err["message"])


# ---- /generate -----------------------------------------------------------------------------------


def test_generate_text_and_ids_with_logprobs(http):
    r = http.post(
        "/generate",
        json={"text": "The capital of France is", "sampling_params": GREEDY, "return_logprob": True},
    )
    a = r.json()
    meta = a["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["completion_tokens"] == 6 and len(a["output_ids"]) == 6 and isinstance(a["text"], str)
    assert [t for _, t, _ in meta["output_token_logprobs"]] == a["output_ids"]
    assert all(lp <= 0 for lp, _, _ in meta["output_token_logprobs"])
    assert meta["weight_version"] == "0" and meta["e2e_latency"] > 0 and meta["input_token_logprobs"] == []
    assert meta["prompt_tokens"] > 1  # the text was tokenized
    b = http.post(
        "/generate",
        json={
            "input_ids": [5, 6, 7, 8],
            "sampling_params": GREEDY,
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
        },
    ).json()
    inputs = b["meta_info"]["input_token_logprobs"]
    assert (
        [t for _, t, _ in inputs] == [5, 6, 7, 8]
        and inputs[0][0] is None
        and all(x[0] < 0 for x in inputs[1:])
    )
    assert all(isinstance(x[2], str) for x in b["meta_info"]["output_token_logprobs"])
    assert len(b["meta_info"]["output_top_logprobs"]) == 6 and all(
        len(p) == 2 for p in b["meta_info"]["output_top_logprobs"]
    )
    # greedy is deterministic, and the second time the prompt's full blocks come from the cache
    again = http.post(
        "/generate", json={"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13], "sampling_params": GREEDY}
    ).json()
    again2 = http.post(
        "/generate", json={"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13], "sampling_params": GREEDY}
    ).json()
    assert again["output_ids"] == again2["output_ids"] and again2["meta_info"]["cached_tokens"] == 8


def test_generate_batch_n_and_rid(http):
    r = http.post(
        "/generate",
        json={"text": ["a", "b"], "sampling_params": [dict(GREEDY, n=2), GREEDY], "rid": ["x", "y"]},
    ).json()
    assert [o["meta_info"]["id"] for o in r] == ["x-0", "x-1", "y"]
    assert r[0]["output_ids"] == r[1]["output_ids"]  # greedy: the n samples agree
    seeded = http.post(
        "/generate",
        json={
            "input_ids": [[3, 4], [3, 4]],
            "sampling_params": [{"sampling_seed": 7, "max_new_tokens": 5}] * 2,
        },
    ).json()
    assert seeded[0]["output_ids"] == seeded[1]["output_ids"]


def test_generate_stream_sse(http):
    chunks = []
    with http.stream(
        "POST", "/generate", json={"input_ids": [1, 2, 3], "sampling_params": GREEDY, "stream": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                chunks.append(line)
    assert chunks[-1] == "data: [DONE]"
    bodies = [json.loads(c[len("data: ") :]) for c in chunks[:-1]]
    assert [len(b["output_ids"]) for b in bodies] == list(range(1, 7))
    assert all(b["meta_info"]["finish_reason"] is None for b in bodies[:-1])
    assert bodies[-1]["meta_info"]["finish_reason"]["type"] == "length"
    full = http.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": GREEDY}).json()
    assert bodies[-1]["output_ids"] == full["output_ids"] and bodies[-1]["text"] == full["text"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input_ids": [1], "bogus": 1}, "bogus"),
        ({"input_ids": [1], "return_routed_experts": True}, "return_routed_experts"),
        ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "sampling_params"),
        ({"input_ids": [1], "sampling_params": {"top_p": 0}}, "sampling_params"),
        ({"input_ids": [1], "sampling_params": {"colour": 1}}, "sampling_params"),
        ({"input_ids": [1] * 300}, "input_ids"),
        ({"input_ids": []}, "input_ids"),
        ({"text": ""}, "text"),
        ({"input_ids": [1, 10**9]}, "input_ids"),
        ({"input_ids": [-1]}, "input_ids"),
        ({"input_ids": ["a"]}, "input_ids"),
        ({}, "text"),
        ({"text": "a", "input_ids": [1]}, "text"),
        ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
        ({"input_ids": [1], "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params"),
        ({"input_ids": [1], "stream": True, "sampling_params": {"n": 2}}, "stream"),
    ],
)
def test_generate_bad_input_is_400_naming_the_field(http, body, field):
    _error(http.post("/generate", json=body), field)


def test_bad_json_and_server_survives(http):
    r = http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert "invalid JSON" in _error(r, None)
    assert "JSON object" in _error(http.post("/generate", json=[1, 2]), None)
    _error(http.post("/abort_request", json={"rid": "x", "extra": 1}), "extra")
    r = http.post(
        "/generate", json={"input_ids": [1], "rid": "dup", "sampling_params": {"max_new_tokens": 1}}
    )
    assert r.status_code == 200
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/health_generate").status_code == 200


# ---- info and metrics ---------------------------------------------------------------------------


def test_info_endpoints(http, tiny_model_dir):
    info = http.get("/get_model_info").json()
    assert info["model_path"] == tiny_model_dir and info["is_generation"] is True
    server = http.get("/get_server_info").json()
    assert (
        server["page_size"] == 8
        and "api_key" not in server
        and server["internal_states"][0]["num_blocks"] == 512
    )
    assert (
        http.get("/get_weight_version").json()["weight_version"]
        == http.get("/get_model_info").json()["weight_version"]
    )
    assert http.get("/v1/models").json()["data"][0]["id"] == tiny_model_dir
    before = _metrics(http)
    http.post("/generate", json={"input_ids": [9, 9], "sampling_params": GREEDY})
    after = _metrics(http)
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 6
    assert after["num_running_reqs"] == 0 and after["num_queue_reqs"] == 0 and "gen_throughput" in after
    assert http.get("/flush_cache").json()["success"] is True
    assert http.post("/flush_cache").status_code == 200


# ---- control plane -------------------------------------------------------------------------------


def test_pause_in_place_abort_and_continue(http):
    assert http.post("/pause_generation", json={"mode": "in_place"}).json()["success"] is True
    result = {}
    t = threading.Thread(
        target=lambda: result.update(
            r=http.post(
                "/generate", json={"input_ids": [4, 5], "rid": "held", "sampling_params": GREEDY}
            ).json()
        )
    )
    t.start()
    deadline = time.monotonic() + 5
    while (
        _metrics(http)["num_queue_reqs"] + _metrics(http)["num_running_reqs"] < 1
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert t.is_alive()  # paused: nothing runs
    assert http.post("/abort_request", json={"rid": "held"}).json()["aborted"] == ["held"]
    t.join(5)
    assert result["r"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert http.post("/continue_generation", json={}).json()["success"] is True
    _error(http.post("/pause_generation", json={"mode": "sideways"}), "mode")
    http.post("/continue_generation", json={})
    assert http.post("/abort_request", json={"abort_all": True}).status_code == 200
    _error(http.post("/abort_request", json={}), "rid")


def _serialize(named: list[tuple[str, torch.Tensor]]) -> str:
    from miles.engine.tensor_wire import encode_safetensors

    return encode_safetensors(named)


def test_weight_updates_and_memory(http, tiny_model_dir):
    prompt = {"input_ids": [7, 8, 9], "sampling_params": GREEDY}
    base = http.post("/generate", json=prompt).json()["output_ids"]
    r = http.post(
        "/update_weights_from_disk", json={"model_path": tiny_model_dir, "weight_version": "5"}
    ).json()
    assert r["success"] is True and r["weight_version"] == "5"
    out = http.post("/generate", json=prompt).json()
    assert out["output_ids"] == base and out["meta_info"]["weight_version"] == "5"
    bad = http.post("/update_weights_from_disk", json={"model_path": "/nonexistent"})
    assert (
        bad.status_code == 400 and bad.json()["success"] is False and "/nonexistent" in bad.json()["message"]
    )
    _error(http.post("/update_weights_from_disk", json={}), "model_path")

    norm = torch.full((64,), 2.0)
    r = http.post(
        "/update_weights_from_tensor",
        json={"serialized_named_tensors": [_serialize([("model.norm.weight", norm)])], "weight_version": "6"},
    )
    assert r.json() == {"success": True, "message": "ok", "weight_version": "6"}
    assert http.get("/get_weight_version").json() == {"weight_version": "6"}
    r = http.post(
        "/update_weights_from_tensor",
        json={"serialized_named_tensors": [_serialize([("no.such.weight", norm)])]},
    )
    assert r.status_code == 400 and "no.such.weight" in r.json()["message"]
    _error(
        http.post("/update_weights_from_tensor", json={"serialized_named_tensors": ["!!"]}),
        "serialized_named_tensors",
    )

    r = http.post(
        "/update_weights_from_distributed",
        json={"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "nope"},
    )
    assert r.status_code == 400 and "nope" in r.json()["message"]
    _error(
        http.post(
            "/update_weights_from_distributed",
            json={"names": ["a"], "dtypes": [], "shapes": [], "group_name": "g"},
        ),
        "names",
    )
    _error(http.post("/init_weights_update_group", json={"master_address": "127.0.0.1"}), "master_port")
    assert http.post("/destroy_weights_update_group", json={"group_name": "nope"}).json()["success"] is True

    assert (
        http.post("/release_memory_occupation", json={"tags": ["kv_cache", "weights"]}).json()["success"]
        is True
    )
    assert http.post("/resume_memory_occupation", json={}).json()["success"] is True
    assert http.post("/release_memory_occupation", json={"tags": ["gpu"]}).status_code == 400
    http.post("/update_weights_from_disk", json={"model_path": tiny_model_dir, "weight_version": "0"})
    assert http.post("/generate", json=prompt).json()["output_ids"] == base


def test_a_refused_update_leaves_what_the_server_serves(http, tiny_model_dir, tmp_path):
    """Through HTTP, as a client sees it: every refused update (a bad version, a NaN, another
    model's weights under a bad version, a half-written file) answers 400 and
    ``/get_weights_by_name`` and ``/get_weight_version`` serve exactly what they did before."""
    import shutil

    from safetensors.torch import load_file, save_file

    def served() -> tuple[list[float], str]:
        norm = http.post("/get_weights_by_name", json={"name": "model.norm.weight", "truncate_size": 1 << 20})
        return norm.json(), http.get("/get_weight_version").json()["weight_version"]

    before = served()
    other = tmp_path / "other"  # model B: the same shapes, other values
    shutil.copytree(tiny_model_dir, other)
    (weights,) = other.glob("*.safetensors")
    save_file({k: v + 1.0 for k, v in load_file(weights).items()}, weights)
    half = tmp_path / "half"
    shutil.copytree(tiny_model_dir, half)
    (part,) = half.glob("*.safetensors")
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    norm = torch.full((64,), 3.0)
    refused = [
        ("/update_weights_from_disk", {"model_path": str(other), "weight_version": "v2"}),
        ("/update_weights_from_disk", {"model_path": str(other), "weight_version": -5}),
        ("/update_weights_from_disk", {"model_path": str(half)}),
        ("/update_weights_from_tensor", {"serialized_named_tensors": [_serialize([("model.norm.weight", norm)])],
                                         "weight_version": "v2"}),
        ("/update_weights_from_tensor",
         {"serialized_named_tensors": [_serialize([("model.norm.weight", torch.full((64,), float("nan")))])]}),
    ]  # fmt: skip
    for path, body in refused:
        r = http.post(path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        assert served() == before, (path, body)


def test_shared_memory_tensor_update_and_weight_read_back(http, tiny_model_dir):
    """SGLang's MultiprocessingSerializer format (the colocated trainer's): the engine maps the
    sender's shared-memory tensor and serves exactly those values back from /get_weights_by_name."""
    from miles.engine.tensor_wire import encode_shared

    norm = torch.linspace(-1.0, 1.0, 64)
    named = [("model.norm.weight", norm.clone())]
    r = http.post("/update_weights_from_tensor",
                  json={"serialized_named_tensors": [encode_shared(named)], "weight_version": "7"})  # fmt: skip
    assert r.status_code == 200 and r.json()["weight_version"] == "7", r.text
    assert named[0][1].is_shared()  # handed over in place, not copied through the request
    back = http.post("/get_weights_by_name", json={"name": "model.norm.weight", "truncate_size": 64}).json()
    assert torch.equal(torch.tensor(back, dtype=torch.float32), norm)
    assert (
        len(http.post("/get_weights_by_name", json={"name": "model.norm.weight", "truncate_size": 3}).json())
        == 3
    )
    missing = http.post("/get_weights_by_name", json={"name": "no.such"})
    assert missing.status_code == 400 and "no.such" in missing.json()["message"]
    _error(http.post("/get_weights_by_name", json={}), "name")
    _error(
        http.post("/get_weights_by_name", json={"name": "model.norm.weight", "truncate_size": 0}),
        "truncate_size",
    )
    http.post("/update_weights_from_disk", json={"model_path": tiny_model_dir, "weight_version": "0"})


# ---- client disconnect -----------------------------------------------------------------------------


def test_disconnect_aborts_and_frees_blocks(http, server_url):
    total = _metrics(http)["num_free_blocks"]
    http.post("/pause_generation", json={"mode": "in_place"})  # requests wait: the abort is the only way out
    try:
        body = {"input_ids": list(range(1, 40)), "sampling_params": GREEDY}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server_url}/generate", json=body, timeout=httpx.Timeout(0.5, connect=5))
        with (
            pytest.raises(httpx.ReadTimeout),
            httpx.stream("POST", f"{server_url}/generate", json={**body, "stream": True}, timeout=0.5) as r,
        ):
            for _ in r.iter_lines():
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            m = _metrics(http)
            if m["num_queue_reqs"] + m["num_running_reqs"] == 0:
                break
            time.sleep(0.05)
        assert m["num_queue_reqs"] + m["num_running_reqs"] == 0
    finally:
        http.post("/continue_generation", json={})
    assert _metrics(http)["num_free_blocks"] == total


# ---- OpenAI API (the official client) ---------------------------------------------------------------


def test_openai_client_completions_chat_and_streaming(server_url, tiny_model_dir):
    import openai

    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [tiny_model_dir]
    c = client.completions.create(
        model="m", prompt=["Hello", "Bye"], max_tokens=5, temperature=0, n=2, logprobs=2
    )
    assert len(c.choices) == 4 and c.usage.completion_tokens == 20 and c.choices[0].text == c.choices[1].text
    assert len(c.choices[0].logprobs.tokens) == 5 and len(c.choices[0].logprobs.top_logprobs[0]) == 2
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    chat = client.chat.completions.create(
        model="m", messages=msgs, max_tokens=6, n=3, seed=1, logprobs=True, top_logprobs=1
    )
    assert len(chat.choices) == 3 and all(ch.message.role == "assistant" for ch in chat.choices)
    assert len(chat.choices[0].logprobs.content) == 6 and chat.choices[0].finish_reason == "length"
    again = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, n=3, seed=1)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in chat.choices]
    stream = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, seed=1, stream=True)
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    text_stream = client.completions.create(
        model="m",
        prompt="Hello",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(text_stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="m", prompt="Hi", temperature=-2)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model="m", messages=msgs, tools=[{"type": "function", "function": {"name": "f"}}]
        )


# ---- auth and admin ------------------------------------------------------------------------------


def _asgi(app, client: tuple[str, int], host: str = "localhost"):
    """An httpx client that reaches ``app`` as if from ``client`` (a remote address, say)."""
    transport = httpx.ASGITransport(app=app, client=client)
    return httpx.AsyncClient(transport=transport, base_url=f"http://{host}")


def test_api_key_and_admin_key_rules(local_engine, tiny_model_dir):
    from miles.engine.server import ServerConfig, create_app

    keys = ServerConfig(tiny_model_dir, api_key="sekret", admin_api_key="admin-sekret")
    keyed = ThreadServer(create_app(local_engine, keys)).start()
    api, admin = {"Authorization": "Bearer sekret"}, {"Authorization": "Bearer admin-sekret"}
    try:
        with httpx.Client(base_url=keyed.url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            assert http.get("/get_model_info").status_code == 401
            assert (
                http.post(
                    "/generate", json={"input_ids": [1]}, headers={"Authorization": "Bearer nope"}
                ).status_code
                == 401
            )
            one = {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}
            assert http.post("/generate", json=one, headers=api).status_code == 200
            assert http.post("/generate", json=one, headers=admin).status_code == 200  # opens everything
            # the API key never opens an admin endpoint, even from loopback; the admin key does
            r = http.post("/continue_generation", json={}, headers=api)
            assert r.status_code == 401 and "admin key" in r.json()["error"]["message"]
            assert http.post("/continue_generation", json={}, headers=admin).json()["success"] is True
            info = http.get("/get_server_info", headers=api).json()
            assert (
                "api_key" not in info
                and "admin_api_key" not in info
                and "admin-sekret" not in json.dumps(info)
            )
    finally:
        keyed.stop()
    assert "sekret" not in repr(keys)

    async def remote() -> list[int]:
        open_app = create_app(local_engine, ServerConfig(tiny_model_dir))
        keyed_app = create_app(local_engine, ServerConfig(tiny_model_dir, admin_api_key="admin-sekret"))
        codes = []
        async with _asgi(open_app, ("10.1.2.3", 4567)) as c:  # no admin key: remote admin refused
            codes += [(await c.post("/continue_generation", json={})).status_code]
            codes += [(await c.get("/get_weight_version")).status_code]
        async with _asgi(open_app, ("127.0.0.1", 4567), host="evil.example:30000") as c:  # DNS rebinding
            codes += [(await c.post("/continue_generation", json={})).status_code]
        async with _asgi(open_app, ("127.0.0.1", 4567), host="127.0.0.1:30000") as c:
            codes += [(await c.post("/continue_generation", json={})).status_code]
        async with _asgi(keyed_app, ("10.1.2.3", 4567)) as c:  # remote admin with the admin key
            codes += [(await c.post("/continue_generation", json={})).status_code]
            codes += [(await c.post("/continue_generation", json={}, headers=admin)).status_code]
            codes += [(await c.get("/get_weight_version")).status_code]  # no API key: open
        async with _asgi(keyed_app, ("127.0.0.1", 4567)) as c:  # loopback is no key
            codes += [(await c.post("/continue_generation", json={})).status_code]
        return codes

    assert asyncio.run(remote()) == [403, 200, 403, 200, 401, 200, 200, 401]


class _Exploit:
    """The payload of the attack: unpickling it runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickled_payload_is_refused_and_never_runs(http, tmp_path):
    """The exact attack (a pickle whose ``__reduce__`` calls ``os.system``) through the real
    server: refused with a JSON content type (loopback, no key) and with text/plain, and the
    command never runs."""
    marker = tmp_path / "pwned"
    blob = base64.b64encode(pickle.dumps(_Exploit(f"touch {marker}"))).decode()
    payload = {"serialized_named_tensors": [blob]}
    r = http.post("/update_weights_from_tensor", json=payload)
    assert r.status_code == 400 and r.json()["error"]["param"] == "serialized_named_tensors", r.text
    assert "not allowed" in r.json()["error"]["message"]
    r = http.post(
        "/update_weights_from_tensor", content=json.dumps(payload), headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415
    r = http.post("/pause_generation", content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = http.post("/pause_generation")  # no body, no content type: what a cross-site form can send
    assert r.status_code == 415
    assert not marker.exists()  # os.system runs before it returns: the file would be there
    assert http.get("/health").json() == {"status": "ok"}


def test_shared_memory_tensors_are_refused_from_another_host(local_engine, tiny_model_dir):
    """CUDA-IPC / shared-memory handles only mean something on the sender's host: a remote caller,
    even with the admin key, must send safetensors."""
    from miles.engine.server import ServerConfig, create_app
    from miles.engine.tensor_wire import encode_safetensors, encode_shared

    app = create_app(local_engine, ServerConfig(tiny_model_dir, admin_api_key="admin-sekret"))
    admin = {"Authorization": "Bearer admin-sekret"}
    norm = torch.full((64,), 1.5)

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with _asgi(app, ("10.1.2.3", 4567)) as c:
            shared = await c.post("/update_weights_from_tensor", headers=admin,
                                  json={"serialized_named_tensors": [encode_shared([("model.norm.weight", norm.clone())])]})  # fmt: skip
            plain = await c.post(
                "/get_weights_by_name", headers=admin, json={"name": "model.norm.weight", "truncate_size": 2}
            )
        return shared, plain

    shared, plain = asyncio.run(main())
    assert shared.status_code == 400 and "this host" in shared.json()["error"]["message"], shared.text
    assert plain.json() != [1.5, 1.5]  # nothing was applied
    assert encode_safetensors([("model.norm.weight", norm)])  # the way a remote trainer sends them


def test_an_error_keeps_the_keep_alive_connection(local_engine, tiny_model_dir):
    """A 500 (an unexpected exception in a handler) answers JSON and the same connection serves
    the next requests (Starlette's handler re-raised it and uvicorn then closed the connection:
    ECONNRESET for the client's next request on it)."""
    from miles.engine.server import ServerConfig, create_app

    app = create_app(local_engine, ServerConfig(tiny_model_dir))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("injected fault")

    server = ThreadServer(app).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=1)) as http:
            r = http.get("/boom")
            assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
            first = r.extensions["network_stream"].get_extra_info("client_addr")
            for _ in range(10):
                r = http.post(
                    "/generate", json={"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 1}}
                )
                assert r.status_code == 200
                assert (
                    r.extensions["network_stream"].get_extra_info("client_addr") == first
                )  # same connection
            r = http.post(
                "/generate", content=b'{"text": "\\ud800"}', headers={"content-type": "application/json"}
            )
            assert (
                r.status_code == 400 and r.extensions["network_stream"].get_extra_info("client_addr") == first
            )
    finally:
        server.stop()


def test_generating_while_memory_is_released_is_503_saying_why(http):
    assert http.post("/release_memory_occupation", json={"tags": ["kv_cache"]}).json()["success"] is True
    try:
        r = http.post("/generate", json={"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 1}})
        assert r.status_code == 503 and "released" in r.json()["error"]["message"], r.text
        r = http.post("/v1/completions", json={"prompt": [3, 4], "max_tokens": 1})
        assert r.status_code == 503 and "released" in r.json()["error"]["message"], r.text
    finally:
        assert http.post("/resume_memory_occupation", json={}).json()["success"] is True
    assert (
        http.post(
            "/generate", json={"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 1}}
        ).status_code
        == 200
    )


def test_full_engine_answers_503_with_retry_after(local_engine, tiny_model_dir):
    """With no room to queue, a request beyond the running ones is refused at once (503 +
    Retry-After), and the ones admitted still complete."""
    from miles.config import EngineConfig
    from miles.engine.async_engine import AsyncEngine
    from miles.engine.server import ServerConfig, build_engine, create_app

    settings = EngineConfig(max_total_tokens=512, page_size=8, max_running_requests=2, max_queued_requests=0)
    config = ServerConfig(tiny_model_dir, engine=settings)
    engine = AsyncEngine(build_engine(config)).start()
    server = ThreadServer(create_app(engine, config)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.post("/pause_generation", json={"mode": "in_place"}).json()["success"] is True
            held = [{"input_ids": [5, i + 1], "sampling_params": {"max_new_tokens": 2}} for i in range(2)]
            results: list[httpx.Response] = []
            threads = [
                threading.Thread(target=lambda b=b: results.append(http.post("/generate", json=b)))
                for b in held
            ]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while engine.num_unfinished < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            r = http.post("/generate", json={"input_ids": [6], "sampling_params": {"max_new_tokens": 1}})
            assert (
                r.status_code == 503
                and r.headers["retry-after"] == "1"
                and "full" in r.json()["error"]["message"]
            )
            assert http.get("/health").status_code == 200
            http.post("/continue_generation", json={})
            for t in threads:
                t.join(30)
            assert [x.status_code for x in results] == [200, 200]
    finally:
        server.stop()
        engine.close()


def test_update_group_rendezvous_times_out_without_blocking_generation(local_engine, tiny_model_dir):
    """``/init_weights_update_group`` to a closed port: it fails with a clear message once its
    timeout has passed, and a ``/generate`` sent meanwhile completes (the rendezvous used to run
    on the engine thread, which froze generation for up to ten minutes)."""
    from miles.engine.server import ServerConfig, create_app
    from tests.engine.conftest import free_port

    config = ServerConfig(tiny_model_dir, weight_update_group_timeout_s=2.0)
    server = ThreadServer(create_app(local_engine, config)).start()
    port = free_port()  # nothing listens there
    body = {
        "master_address": "127.0.0.1",
        "master_port": port,
        "rank_offset": 1,
        "world_size": 2,
        "group_name": "g",
    }
    answer: dict[str, httpx.Response] = {}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            joining = threading.Thread(
                target=lambda: answer.update(r=http.post("/init_weights_update_group", json=body))
            )
            joining.start()
            time.sleep(0.3)  # the rendezvous has started
            r = httpx.post(
                f"{server.url}/generate",
                json={"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 4}},
                timeout=60,
            )
            assert r.status_code == 200 and len(r.json()["output_ids"]) == 4
            assert joining.is_alive()  # generation did not wait for the rendezvous
            joining.join(120)
        r = answer["r"]
        assert r.status_code == 400 and r.json()["success"] is False
        assert f"127.0.0.1:{port}" in r.json()["message"] and "within 2 s" in r.json()["message"]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"master_port": -1}, "master_port"),
        ({"master_port": 70000}, "master_port"),
        ({"world_size": 1}, "world_size"),
        ({"rank_offset": 0}, "rank_offset"),
        ({"rank_offset": 2}, "rank_offset"),
        ({"backend": "mpi"}, "backend"),
        ({"master_address": ""}, "master_address"),
        ({"group_name": ""}, "group_name"),
        ({"master_port": "80"}, "master_port"),
    ],
)
def test_update_group_fields_are_validated(http, patch, field):
    body = {
        "master_address": "127.0.0.1",
        "master_port": 29500,
        "rank_offset": 1,
        "world_size": 2,
        "group_name": "g",
    }
    _error(http.post("/init_weights_update_group", json={**body, **patch}), field)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/pause_generation", {"mode": 5}, "mode"),
        ("/pause_generation", {"mode": "Retract"}, "mode"),
        ("/continue_generation", {"now": True}, "now"),
        ("/release_memory_occupation", {"tags": "kv_cache"}, "tags"),
        ("/resume_memory_occupation", {"tags": [1]}, "tags"),
        ("/update_weights_from_disk", {"model_path": 3}, "model_path"),
        ("/update_weights_from_disk", {"model_path": "m", "flush_cache": "yes"}, "flush_cache"),
        ("/update_weights_from_disk", {"model_path": "m", "weight_version": True}, "weight_version"),
        ("/update_weights_from_disk", {"model_path": "m", "load_format": "pt"}, "load_format"),
        ("/update_weights_from_disk", {"model_path": "m", "bogus": 1}, "bogus"),
        ("/update_weights_from_tensor", {}, "serialized_named_tensors"),
        ("/update_weights_from_tensor", {"serialized_named_tensors": [], "load_format": "x"}, "load_format"),
        ("/update_weights_from_distributed", {"names": "w", "dtypes": [], "shapes": [], "group_name": "g"}, "names"),
        ("/update_weights_from_distributed",
         {"names": [], "dtypes": [], "shapes": [], "group_name": "g", "load_format": "flattened_bucket"}, "load_format"),
        ("/destroy_weights_update_group", {"group_name": ["g"]}, "group_name"),
        ("/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": True}, "truncate_size"),
        ("/abort_request", {"rid": 7}, "rid"),
    ],
)  # fmt: skip
def test_admin_bodies_are_typed_and_name_the_field(http, path, body, field):
    """Each admin body is a typed request: a wrong type, a missing or unknown field is a 400 that
    names the field, before the engine is touched."""
    _error(http.post(path, json=body), field)


def test_a_weight_update_can_abort_every_request_first(http, tiny_model_dir):
    """SGLang's ``abort_all_requests``: the requests in flight end (reason ``abort``) before the
    weights change, instead of finishing under new weights."""
    assert http.post("/pause_generation", json={"mode": "in_place"}).json()["success"] is True
    result: dict[str, Any] = {}
    body = {"input_ids": [4, 5], "rid": "before-update", "sampling_params": GREEDY}
    t = threading.Thread(target=lambda: result.update(r=http.post("/generate", json=body).json()))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while _metrics(http)["num_queue_reqs"] + _metrics(http)["num_running_reqs"] < 1:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.05)
        update = {"model_path": tiny_model_dir, "weight_version": "0", "abort_all_requests": True}
        assert http.post("/update_weights_from_disk", json=update).json()["success"] is True
        t.join(30)
        assert result["r"]["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        http.post("/continue_generation", json={})
        t.join(30)


def test_remote_tensor_broadcast_sizes_are_bounded(http):
    big = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[10**12]], "group_name": "g"}
    _error(http.post("/update_weights_from_distributed", json=big), "shapes")
    _error(http.post("/update_weights_from_distributed", json={**big, "shapes": [[-1]]}), "shapes")
    _error(
        http.post("/update_weights_from_distributed", json={**big, "dtypes": ["Size"], "shapes": [[1]]}),
        "dtypes",
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--allow-remote-admin"], "--allow-remote-admin was removed"),
        (["--api-key", "same", "--admin-api-key", "same"], "must differ from --api-key"),
        (["--admin-api-key", ""], "must not be empty"),
        (["--max-request-bytes", "0"], "--max-request-bytes must be >= 1"),
        (["--sglang-max-queued-requests", "-1"], "--sglang-max-queued-requests must be >= 0"),
        (["--weight-update-group-timeout", "0"], "--weight-update-group-timeout must be > 0"),
    ],
)
def test_serve_flag_errors_say_what_to_do(flags, message, capsys, monkeypatch):
    from miles.cli import main

    monkeypatch.delenv("MILES_ADMIN_API_KEY", raising=False)
    assert main(["serve", "--hf-checkpoint", "unused", *flags]) == 2
    assert message in capsys.readouterr().err

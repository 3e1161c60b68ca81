"""The hostile-payload corpus: every request that once ran code, hung or crashed ``miles serve``,
or answered 500 where a 400 was due, sent to a real server process (API key, admin key, 1 MiB
bodies, at most 64 requests per call). For each: the expected status, ``/health`` answering right
after, and the same keep-alive connection still serving (a 500 used to reset it)."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.reliability.conftest import ADMIN_KEY, API_KEY, MAX_REQUEST_BYTES, MAX_REQUESTS_PER_CALL

MARKER = Path(tempfile.gettempdir()) / f"miles-corpus-pwned-{os.getpid()}"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
JSON = {"content-type": "application/json"}
ONE = {"max_new_tokens": 1}


class _Exploit:
    """Unpickling it runs a shell command (the observed attack)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {MARKER}",))


class _Stateful:
    """Unpickling it needs BUILD (``__setstate__``): an opcode that can mutate any object."""

    def __setstate__(self, state: Any) -> None:
        MARKER.touch()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _torch_save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _tensors(*blobs: bytes) -> dict[str, Any]:
    return {"serialized_named_tensors": [_b64(b) for b in blobs]}


GROUP = {
    "master_address": "127.0.0.1",
    "master_port": 29500,
    "rank_offset": 1,
    "world_size": 2,
    "group_name": "g",
}


@dataclass(frozen=True)
class Case:
    """One hostile request: ``body`` is JSON (a dict or list) or raw bytes."""

    name: str
    path: str
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=lambda: dict(API))
    method: str = "POST"


CORPUS = [
    # ---- 1: code execution through the weight endpoint, and cross-site requests ---------------
    Case("pickle_rce_no_key", "/update_weights_from_tensor", 401, _tensors(pickle.dumps(_Exploit())), {}),
    Case("pickle_rce_api_key", "/update_weights_from_tensor", 401, _tensors(pickle.dumps(_Exploit()))),
    Case(
        "pickle_rce_admin_key", "/update_weights_from_tensor", 400, _tensors(pickle.dumps(_Exploit())), ADMIN
    ),
    Case(
        "pickle_rce_protocol_0",
        "/update_weights_from_tensor",
        400,
        _tensors(pickle.dumps(_Exploit(), 0)),
        ADMIN,
    ),
    Case(
        "pickle_build_opcode",
        "/update_weights_from_tensor",
        400,
        _tensors(pickle.dumps(_Stateful(), 2)),
        ADMIN,
    ),
    Case(
        "torch_save_zip",
        "/update_weights_from_tensor",
        400,
        _tensors(_torch_save([("w", torch.ones(2))])),
        ADMIN,
    ),
    Case("pickle_two_ranks", "/update_weights_from_tensor", 400, _tensors(b"x", b"y"), ADMIN),
    Case(
        "pickle_text_plain",
        "/update_weights_from_tensor",
        415,
        json.dumps(_tensors(pickle.dumps(_Exploit()))).encode(),
        {**ADMIN, "content-type": "text/plain"},
    ),
    Case("pause_text_plain", "/pause_generation", 415, b"{}", {**ADMIN, "content-type": "text/plain"}),
    Case("pause_no_content_type", "/pause_generation", 415, b"", ADMIN),
    Case("pause_api_key", "/pause_generation", 401, {}),
    Case("release_memory_no_key", "/release_memory_occupation", 401, {}, {}),
    Case(
        "generate_text_plain", "/generate", 415, b'{"input_ids": [1]}', {**API, "content-type": "text/plain"}
    ),
    Case(
        "generate_form",
        "/generate",
        415,
        b"input_ids=1",
        {**API, "content-type": "application/x-www-form-urlencoded"},
    ),
    Case("generate_no_key", "/generate", 401, {"input_ids": [1], "sampling_params": ONE}, {}),
    # ---- 2: one request that takes the server down ----------------------------------------------
    Case(
        "n_1e30",
        "/generate",
        400,
        {"input_ids": [4, 10], "sampling_params": {"n": 10**30, "max_new_tokens": 1}},
    ),
    Case("completions_n_1e12", "/v1/completions", 400, {"prompt": "hi", "n": 10**12, "max_tokens": 1}),
    Case(
        "chat_n_1e12",
        "/v1/chat/completions",
        400,
        {"messages": [{"role": "user", "content": "hi"}], "n": 10**12},
    ),
    Case("n_times_prompts", "/generate", 400, {"input_ids": [[1]] * 10, "sampling_params": {"n": 10, **ONE}}),
    Case("too_many_prompts", "/generate", 400, {"input_ids": [[1]] * (MAX_REQUESTS_PER_CALL + 1)}),
    Case("too_many_texts", "/generate", 400, {"text": ["a"] * (MAX_REQUESTS_PER_CALL + 1)}),
    Case("completions_prompts_times_n", "/v1/completions", 400, {"prompt": ["a"] * 16, "n": 8}),
    Case("text_50mb", "/generate", 413, {"text": "a" * 50_000_000}),
    Case("text_past_the_context", "/generate", 400, {"text": "lorem ipsum " * 60_000}),
    Case("prompt_past_the_context", "/v1/completions", 400, {"prompt": "lorem ipsum " * 60_000}),
    Case(
        "chat_past_the_context",
        "/v1/chat/completions",
        400,
        {"messages": [{"role": "user", "content": "x " * 400_000}]},
    ),
    Case(
        "chat_too_many_messages",
        "/v1/chat/completions",
        400,
        {"messages": [{"role": "user", "content": ""}] * 5000},
    ),
    Case("input_ids_past_the_context", "/generate", 400, {"input_ids": [1] * 100_000}),
    Case(
        "top_logprobs_1e9",
        "/generate",
        400,
        {"input_ids": [1], "return_logprob": True, "top_logprobs_num": 10**9},
    ),
    Case("rid_10k_chars", "/generate", 400, {"input_ids": [1], "rid": "r" * 10_000, "sampling_params": ONE}),
    Case("content_length_past_the_limit", "/generate", 413, b" " * (MAX_REQUEST_BYTES + 1), {**API, **JSON}),
    Case(
        "broadcast_1e12_elements",
        "/update_weights_from_distributed",
        400,
        {"names": ["w"], "dtypes": ["float32"], "shapes": [[10**12]], "group_name": "g"},
        ADMIN,
    ),
    Case(
        "broadcast_lengths_differ",
        "/update_weights_from_distributed",
        400,
        {"names": ["w", "v"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "g"},
        ADMIN,
    ),
    # ---- 6: 500 where a 400 is due --------------------------------------------------------------
    Case("lone_surrogate_text", "/generate", 400, b'{"text": "\\ud800"}', {**API, **JSON}),
    Case("lone_surrogate_rid", "/generate", 400, b'{"input_ids": [1], "rid": "\\udfff"}', {**API, **JSON}),
    Case(
        "lone_surrogate_chat",
        "/v1/chat/completions",
        400,
        b'{"messages": [{"role": "user", "content": "\\ud83d"}]}',
        {**API, **JSON},
    ),
    Case("encoded_surrogate_bytes", "/generate", 400, b'{"text": "\xed\xa0\x80"}', {**API, **JSON}),
    Case("invalid_utf8", "/generate", 400, b'{"text": "\xff\xfe"}', {**API, **JSON}),
    Case("nested_100k", "/generate", 400, b"[" * 100_000 + b"]" * 100_000, {**API, **JSON}),
    Case(
        "nested_objects_100k", "/generate", 400, b'{"a":' * 100_000 + b"1" + b"}" * 100_000, {**API, **JSON}
    ),
    Case(
        "nan_constant",
        "/generate",
        400,
        b'{"input_ids": [1], "sampling_params": {"temperature": NaN}}',
        {**API, **JSON},
    ),
    Case(
        "infinity_constant",
        "/generate",
        400,
        b'{"input_ids": [1], "sampling_params": {"top_p": Infinity}}',
        {**API, **JSON},
    ),
    Case("minus_infinity", "/generate", 400, b'{"input_ids": [-Infinity]}', {**API, **JSON}),
    Case(
        "float_overflow",
        "/generate",
        400,
        b'{"input_ids": [1], "sampling_params": {"temperature": 1e999}}',
        {**API, **JSON},
    ),
    Case("int_5000_digits", "/generate", 400, b'{"input_ids": [' + b"9" * 5000 + b"]}", {**API, **JSON}),
    Case("truncated_json", "/generate", 400, b'{"input_ids": [1', {**API, **JSON}),
    Case("json_array_body", "/generate", 400, [1, 2]),
    Case("json_string_body", "/generate", 400, "text"),
    Case("empty_body", "/generate", 400, b"", API),
    Case("unknown_field", "/generate", 400, {"input_ids": [1], "bogus": 1}),
    Case("ignore_eos_string", "/generate", 400, {"input_ids": [1], "sampling_params": {"ignore_eos": "yes"}}),
    Case("group_port_minus_1", "/init_weights_update_group", 400, {**GROUP, "master_port": -1}, ADMIN),
    Case("group_port_65536", "/init_weights_update_group", 400, {**GROUP, "master_port": 65536}, ADMIN),
    Case("group_world_size_0", "/init_weights_update_group", 400, {**GROUP, "world_size": 0}, ADMIN),
    Case("group_rank_offset_minus_1", "/init_weights_update_group", 400, {**GROUP, "rank_offset": -1}, ADMIN),
    Case("group_rank_offset_is_world", "/init_weights_update_group", 400, {**GROUP, "rank_offset": 2}, ADMIN),
    Case("group_backend_mpi", "/init_weights_update_group", 400, {**GROUP, "backend": "mpi"}, ADMIN),
    Case("group_nccl_on_cpu", "/init_weights_update_group", 400, {**GROUP, "backend": "nccl"}, ADMIN),
    Case("group_address_empty", "/init_weights_update_group", 400, {**GROUP, "master_address": ""}, ADMIN),
    Case("group_port_bool", "/init_weights_update_group", 400, {**GROUP, "master_port": True}, ADMIN),
    Case(
        "tensor_not_base64", "/update_weights_from_tensor", 400, {"serialized_named_tensors": ["!!"]}, ADMIN
    ),
    Case("tensor_garbage", "/update_weights_from_tensor", 400, _tensors(b"\x00" * 64), ADMIN),
    Case("get_generate", "/generate", 405, method="GET"),
]


@pytest.fixture(scope="module")
def client(hardened_server: Any) -> Any:
    """One connection for the whole corpus: every answer must leave it usable."""
    with httpx.Client(base_url=hardened_server.url, timeout=60, limits=httpx.Limits(max_connections=1)) as c:
        yield c


def _send(client: httpx.Client, case: Case) -> httpx.Response:
    if isinstance(case.body, bytes):
        return client.request(case.method, case.path, content=case.body, headers=case.headers)
    if case.body is None:
        return client.request(case.method, case.path, headers=case.headers)
    return client.request(case.method, case.path, json=case.body, headers=case.headers)


def _connection(response: httpx.Response) -> Any:
    return response.extensions["network_stream"].get_extra_info("client_addr")


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_payload(client: httpx.Client, case: Case) -> None:
    r = _send(client, case)
    assert r.status_code == case.status, r.text[:500]
    if r.headers.get("content-type", "").startswith("application/json"):
        assert r.json()  # a JSON answer, never a bare traceback
    health = client.get("/health", timeout=5)  # answered at once: nothing is stuck behind the payload
    assert health.json() == {"status": "ok"}
    assert _connection(health) == _connection(r), "the connection was closed after the answer"
    assert not MARKER.exists(), "the payload ran a command"


def test_the_server_still_generates_after_the_corpus(client: httpx.Client) -> None:
    r = client.post(
        "/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 3}}, headers=API
    )
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 3
    assert client.post("/continue_generation", json={}, headers=ADMIN).json()["success"] is True

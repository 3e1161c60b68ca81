"""Default generation of one sample through an ``EngineClient`` (SGLang's ``/generate`` contract).

The rollout side never sees the engine itself: it sends SGLang ``/generate`` payloads and reads
SGLang responses, so our server, an in-process engine, or a real SGLang server all work.
A custom generate function (``--custom-generate-function-path``) replaces ``generate_sample``
with the same signature as slime's: ``async def generate(args, sample, sampling_params) -> Sample
| list[Sample]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from miles.engine.client import decode_routed_experts
from miles.types import Sample, SampleStatus, SamplingParams

_STATUS = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED, "abort": SampleStatus.ABORTED}


class GenerateClient(Protocol):
    """The part of ``EngineClient`` the rollout uses: one SGLang ``/generate`` call."""

    async def generate(self, payload: Mapping[str, Any]) -> Any: ...


def sample_seed(rollout_seed: int, step: int, sample_index: int) -> int:
    """A per-sample sampling seed, so a resumed run regenerates exactly the same rollout."""
    x = (rollout_seed * 1_000_003 + step) * 1_000_033 + sample_index
    return x % (2**31 - 1)


def generate_payload(
    sample: Sample, params: SamplingParams, *, routed_experts: bool = False
) -> dict[str, Any]:
    body = params.to_dict()
    body.pop("n", None)  # one sample per request: the group is n requests sharing the prompt's KV
    payload: dict[str, Any] = {
        "input_ids": list(sample.prompt_ids),
        "sampling_params": body,
        "return_logprob": True,
    }
    if routed_experts:
        payload["return_routed_experts"] = True
    return payload


def apply_response(
    sample: Sample, response: Mapping[str, Any], *, routed_experts_top_k: int | None = None
) -> Sample:
    """Fill ``sample``'s response fields from an SGLang ``/generate`` response (mutates and returns it).

    Appends to an existing response (multi-turn and partial rollouts continue a sample).
    With ``routed_experts_top_k`` (rollout routing replay), ``meta_info.routed_experts`` becomes
    ``sample.routed_experts`` ``[P + R - 1, layers, top_k]``: the response's call covers every
    token it was given plus its output, so it replaces any earlier record.
    """
    meta = response.get("meta_info") or {}
    ids = response.get("output_ids")
    token_logprobs = meta.get("output_token_logprobs")
    if ids is None and token_logprobs is not None:
        ids = [int(t[1]) for t in token_logprobs]
    if ids is None:
        raise ValueError("engine response has neither output_ids nor meta_info.output_token_logprobs")
    if token_logprobs is None or len(token_logprobs) != len(ids):
        raise ValueError(
            f"engine response has {len(ids)} output ids but "
            f"{'no' if token_logprobs is None else len(token_logprobs)} output_token_logprobs"
        )
    logprobs = [float(t[0]) for t in token_logprobs]
    versions = _token_versions(meta, len(ids))
    if sample.response_ids and versions is not None:
        earlier = sample.token_versions()  # None: unknown, or a hook appended tokens (a tool's)
        versions = None if earlier is None else [*earlier, *versions]
    sample.response_ids = list(sample.response_ids) + [int(t) for t in ids]
    sample.response = sample.response + str(response.get("text", ""))
    sample.rollout_logprobs = list(sample.rollout_logprobs or []) + logprobs
    sample.response_versions = versions
    routed = meta.get("routed_experts")
    if routed_experts_top_k is not None and routed is not None:
        sample.routed_experts = decode_routed_experts(routed, sample.total_len, routed_experts_top_k)
    if sample.loss_mask is not None:
        sample.loss_mask = list(sample.loss_mask) + [1] * len(ids)
    reason = (meta.get("finish_reason") or {}).get("type", "stop")
    sample.status = _STATUS.get(reason, SampleStatus.COMPLETED)
    seen = [str(v) for v in versions[len(versions) - len(ids) :]] if versions is not None else []
    if not seen and meta.get("weight_version") is not None:
        seen = [str(meta["weight_version"])]
    for version in seen:  # the versions the response went through, each once, in order
        if not sample.weight_versions or sample.weight_versions[-1] != version:
            sample.weight_versions.append(version)
    return sample


def _token_versions(meta: Mapping[str, Any], n: int) -> list[int] | None:
    """Each output token's weight version: ``meta_info.output_token_weight_versions`` (the
    built-in engine), else ``n`` copies of ``meta_info.weight_version`` (SGLang reports the
    request's; exact unless a weight update came mid-request), else ``None``."""
    per_token = meta.get("output_token_weight_versions")
    if per_token is not None:
        if not isinstance(per_token, list) or len(per_token) != n:
            raise ValueError(
                f"engine response has {n} output ids but output_token_weight_versions is "
                f"{'not a list' if not isinstance(per_token, list) else f'{len(per_token)} long'}"
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in per_token):
            raise ValueError("output_token_weight_versions must be non-negative integers")
        return list(per_token)
    step = version_step(meta.get("weight_version"))
    return None if step is None else [step] * n


def version_step(version: Any) -> int | None:
    """A reported weight version as the step count it names: a non-negative int or decimal
    string; ``None`` for anything else (SGLang's default version is ``"default"``)."""
    if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
        return version
    if isinstance(version, str) and version.isdecimal() and len(version) < 20:
        return int(version)
    return None


async def generate_sample(
    client: GenerateClient, sample: Sample, params: SamplingParams, *, routed_experts_top_k: int | None = None
) -> Sample:
    """Generate ``sample``'s response with one ``/generate`` call; log-probs are always requested,
    and the experts of every token too when ``routed_experts_top_k`` (the model's top-k) is set."""
    payload = generate_payload(sample, params, routed_experts=routed_experts_top_k is not None)
    response = await client.generate(payload)
    if not isinstance(response, Mapping):  # a single-prompt request gets a single response
        raise ValueError(
            f"engine answered a single /generate with {type(response).__name__}, expected an object"
        )
    return apply_response(sample, response, routed_experts_top_k=routed_experts_top_k)

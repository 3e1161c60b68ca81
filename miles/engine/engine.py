"""``Engine``: the inference core (no HTTP, no RL) over the shared model and a paged KV cache.

Drive it with ``add_request`` + ``step`` (continuous batching; each step runs one forward and
reports the requests that got a token or finished) or with ``generate`` (loops ``step`` until
every given prompt is done). Not thread-safe: one caller drives it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from miles.engine.kv_cache import BlockAllocator, KVCache
from miles.engine.model_runner import ModelRunner, ScheduledRequest
from miles.engine.request import FinishReason, Request, RequestOutput, RequestStatus
from miles.engine.sampler import Sampler
from miles.engine.scheduler import Scheduler
from miles.models.transformer import CausalLM
from miles.types import SamplingParams, WeightVersion


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    kv_usage: float  # fraction of blocks referenced by requests
    total_cached_tokens: int
    num_preemptions: int


class Engine:
    """Continuous-batching generation for one ``CausalLM``.

    ``num_blocks`` x ``block_size`` token slots of KV cache are allocated up front.
    ``eos_token_ids`` default to the model config's plus the tokenizer's EOS. ``context_length``
    (default: the model's ``max_position_embeddings``) bounds prompt plus output. A tokenizer
    (anything with ``decode(ids) -> str``) is needed for stop strings and ``text`` in outputs.
    ``seed`` seeds the generator of unseeded requests.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any = None,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_running_requests: int = 256,
        max_num_batched_tokens: int = 4096,
        eos_token_ids: Sequence[int] | None = None,
        context_length: int | None = None,
        enable_prefix_caching: bool = True,
        kv_dtype: torch.dtype | None = None,
        seed: int | None = None,
    ) -> None:
        spec = model.spec
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = spec.vocab_size
        self.context_length = context_length or spec.max_position_embeddings
        if eos_token_ids is None:
            eos = list(spec.eos_token_ids)
            tok_eos = getattr(tokenizer, "eos_token_id", None)
            if isinstance(tok_eos, int) and tok_eos not in eos:
                eos.append(tok_eos)
            eos_token_ids = eos
        self.eos_token_ids = tuple(eos_token_ids)
        self.kv_cache = KVCache(
            spec.num_hidden_layers,
            num_blocks,
            block_size,
            spec.num_key_value_heads,
            spec.head_dim,
            dtype=kv_dtype or model.dtype,
            device=model.device,
        )
        self.allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, max_running_requests, max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv_cache)
        generator = torch.Generator(device=model.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        self.sampler = Sampler(self.eos_token_ids, generator)
        self.weight_version = WeightVersion()
        self._requests: dict[str, Request] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._counter = itertools.count()

    # ---- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        return_prompt_logprobs: bool = False,
        top_logprobs_num: int = 0,
    ) -> str:
        """Queue a request and return its id. Raises ``ValueError`` for input it cannot serve.

        ``return_prompt_logprobs`` computes the whole prompt (no prefix reuse for it) and reports
        the log-probability of each prompt token after the first, under the raw model.
        """
        params = sampling_params or SamplingParams()
        index = next(self._counter)
        rid = str(index) if request_id is None else str(request_id)
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token id")
        bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < self.vocab_size]
        if bad:
            i, t = bad[0]
            raise ValueError(
                f"prompt token id {t} at position {i} is outside the vocabulary [0, {self.vocab_size})"
                + (f" ({len(bad)} bad ids in all)" if len(bad) > 1 else "")
            )
        if len(ids) >= self.context_length:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the context length is {self.context_length}: "
                "leave room for at least one generated token"
            )
        capacity = self.allocator.num_blocks * self.allocator.block_size
        if len(ids) + 1 > capacity:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the KV cache holds {capacity} tokens "
                f"({self.allocator.num_blocks} blocks of {self.allocator.block_size}): raise num_blocks"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("sampling_params.stop (stop strings) needs an engine with a tokenizer")
        if top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {top_logprobs_num}")
        req = Request(
            request_id=rid,
            prompt_ids=ids,
            sampling_params=params,
            weight_version=self.weight_version,
            return_prompt_logprobs=return_prompt_logprobs,
            top_logprobs_num=top_logprobs_num,
            arrival_index=index,
        )
        # Nothing to generate: answered without running (as SGLang does), unless the prompt's
        # logprobs are wanted; those need one forward, so the request is kept then.
        if params.max_new_tokens == 0 and not return_prompt_logprobs:
            req.status = RequestStatus.FINISHED
            req.finish_reason = FinishReason("length", matched=0)
            self._pending_outputs.append(RequestOutput.of(req))
            return rid
        self._requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str | None = None) -> list[str]:
        """Abort one request (or all with ``None``); their blocks go back to the allocator.

        Their final outputs (reason ``abort``, tokens so far) come with the next ``step()``.
        Returns the ids aborted; an unknown or finished id is ignored.
        """
        aborted = self.scheduler.abort(request_id)
        for req in aborted:
            self._requests.pop(req.request_id, None)
            self._pending_outputs.append(RequestOutput.of(req))
        return [r.request_id for r in aborted]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return outputs of requests that got a token or finished."""
        outputs, self._pending_outputs = self._pending_outputs, []
        sched = self.scheduler.schedule()
        for req in sched.out_of_capacity:
            self._finish(req, FinishReason("length", matched=len(req.output_ids)))
            outputs.append(RequestOutput.of(req))
        if not sched.batch:
            return outputs
        result = self.runner.run(sched.batch)
        sampling: list[tuple[int, ScheduledRequest]] = []
        for i, item in enumerate(sched.batch):
            req = item.request
            if req.return_prompt_logprobs:
                self._record_prompt_logprobs(req, item.num_tokens, result.all_logits[i])
            if item.completes_prompt:
                sampling.append((i, item))
            req.num_computed_tokens += item.num_tokens
            req.weight_version = self.weight_version
            self.allocator.mark_computed(req)
        if sampling:
            rows = torch.tensor([i for i, _ in sampling], device=result.last_logits.device)
            reqs = [item.request for _, item in sampling]
            sampled = self.sampler.sample(result.last_logits[rows], reqs, [r.top_logprobs_num for r in reqs])
            for req, tok, lp, top in zip(reqs, sampled.token_ids, sampled.logprobs, sampled.top_logprobs):
                if req.sampling_params.max_new_tokens == 0:  # only prompt logprobs were wanted
                    self._finish(req, FinishReason("length", matched=0))
                else:
                    self._append_token(req, tok, lp, top)
                outputs.append(RequestOutput.of(req))
        return outputs

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (in order) by stepping until they are all finished."""
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling_params")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            outs = self.step()
            for out in outs:
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
            if not outs and not self.has_unfinished() and len(done) < len(ids):
                raise RuntimeError("engine went idle before every request finished")
        return [done[i] for i in ids]

    # ---- cache and stats ---------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Forget all cached prefixes; only when idle (returns ``False`` and does nothing else)."""
        if self.has_unfinished():
            return False
        self.allocator.reset_prefix_cache()
        return True

    def stats(self) -> EngineStats:
        a = self.allocator
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=a.num_blocks,
            num_free_blocks=a.num_free_blocks,
            num_cached_blocks=a.num_cached_blocks,
            kv_usage=a.usage,
            total_cached_tokens=a.total_cached_tokens,
            num_preemptions=self.scheduler.num_preemptions,
        )

    # ---- internals ---------------------------------------------------------------------------

    def _record_prompt_logprobs(self, req: Request, n: int, logits: torch.Tensor | None) -> None:
        assert logits is not None, "the runner returns all logits for prompt-logprob requests"
        start = req.num_computed_tokens
        # Position p predicts prompt token p + 1; after a preemption the prompt is recomputed, and
        # positions already recorded are skipped.
        first = max(start, len(req.prompt_logprobs))
        last = min(start + n, len(req.prompt_ids) - 1)
        if first >= last:
            return
        logp = torch.log_softmax(logits[first - start : last - start], dim=-1)
        targets = torch.tensor(req.prompt_ids[first + 1 : last + 1], device=logp.device)
        req.prompt_logprobs += logp.gather(1, targets[:, None])[:, 0].tolist()

    def _append_token(self, req: Request, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        p = req.sampling_params
        req.output_ids.append(token)
        req.output_logprobs.append(logprob)
        if req.top_logprobs_num > 0:
            req.output_top_logprobs.append(top)
        reason: FinishReason | None = None
        is_stop = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        if is_stop and len(req.output_ids) >= p.min_new_tokens:
            reason = FinishReason("stop", matched=token)
        if self.tokenizer is not None:
            req.text = self.tokenizer.decode(req.output_ids)
            if reason is None and p.stop and len(req.output_ids) >= p.min_new_tokens:
                reason = self._check_stop_strings(req)
        if reason is None and len(req.output_ids) >= p.max_new_tokens:
            reason = FinishReason("length", matched=len(req.output_ids))
        if reason is None and req.num_tokens >= self.context_length:
            reason = FinishReason("length", matched=len(req.output_ids))
        if reason is not None:
            self._finish(req, reason)

    def _check_stop_strings(self, req: Request) -> FinishReason | None:
        text = req.text or ""
        hits = [(text.find(s), s) for s in req.sampling_params.stop if s in text]
        if not hits:
            return None
        pos, stop = min(hits)
        if not req.sampling_params.no_stop_trim:
            req.text = text[:pos]
        return FinishReason("stop", matched=stop)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self.scheduler.finish(req, reason)
        self._requests.pop(req.request_id, None)

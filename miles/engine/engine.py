"""``Engine``: the inference core (no HTTP, no RL) over the shared model and a paged KV cache.

Drive it with ``add_request`` + ``step`` (continuous batching; each step runs one forward and
reports the requests that got a token or finished) or with ``generate`` (loops ``step`` until
every given prompt is done). Not thread-safe: one caller drives it.

RL hooks (all synchronous, from the driving thread): weight updates (in-process tensors, whole or
in buckets; a checkpoint on disk; a torch.distributed broadcast from the trainer), each bumping
``weight_version`` and flushing the prefix cache; ``pause_generation``/``continue_generation``;
``release_memory_occupation``/``resume_memory_occupation`` by tag (``weights``, ``kv_cache``).
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from miles.engine.cuda_graph import DecodeGraphs
from miles.engine.kv_cache import BlockAllocator, KVCache
from miles.engine.model_runner import ModelRunner, ScheduledRequest
from miles.engine.overlap import InflightStep, launch_ahead, plan_ahead
from miles.engine.request import FinishReason, Request, RequestOutput, RequestStatus
from miles.engine.routing import RoutingStore
from miles.engine.sampler import Sampler
from miles.engine.scheduler import Scheduler
from miles.engine.stopping import append_token, ensure_text
from miles.engine.weight_sync import EngineStateError, WeightSyncMixin
from miles.engine.weights import UpdateGroup, WeightUpdater, offload_parameters, restore_parameters
from miles.kernels import batch_invariant
from miles.models.layers import pack_projections, use_inference_kernels
from miles.models.transformer import CausalLM
from miles.types import SamplingParams, WeightVersion

log = logging.getLogger(__name__)


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


MEMORY_TAGS = ("weights", "kv_cache")


class Engine(WeightSyncMixin):
    """Continuous-batching generation for one ``CausalLM``.

    ``num_blocks`` x ``block_size`` token slots of KV cache are allocated up front.
    ``eos_token_ids`` default to the model config's plus the tokenizer's EOS. ``context_length``
    (default: the model's ``max_position_embeddings``) bounds prompt plus output. A tokenizer
    (anything with ``decode(ids) -> str``) is needed for stop strings and ``text`` in outputs.
    ``seed`` seeds the generator of unseeded requests. ``weight_version`` (default ``"0"``) is
    the version of the weights given; every output reports the version it was generated under.
    ``overlap_schedule`` (default: on for dense models on CUDA, off on the CPU where it gains
    nothing) queues each decode step before reading the previous one's tokens (see
    ``miles.engine.overlap``); MoE models never overlap (their steps read expert counts on the host).
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
        weight_version: str | int | None = None,
        cuda_graph_max_bs: int | None = None,
        disable_cuda_graph: bool = False,
        overlap_schedule: bool | None = None,
    ) -> None:
        spec = model.spec
        self.model = model.eval()
        use_inference_kernels(model)
        self._pack = model.device.type == "cuda"  # fewer, larger GEMMs: see pack_projections
        if self._pack:
            pack_projections(model)
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
        self.kv_cache_dtype = kv_dtype or model.dtype
        # Decode CUDA graphs: dense models on CUDA (an MoE step's expert groups and dynamic RoPE's
        # scaling depend on the data, read on the host). Their padding rows need a scratch block.
        graphs = (
            model.device.type == "cuda"
            and not disable_cuda_graph
            and not spec.is_moe
            and spec.rope.type != "dynamic"
        )
        self.kv_cache = KVCache(
            spec.num_hidden_layers,
            num_blocks + 1 if graphs else num_blocks,
            block_size,
            spec.num_key_value_heads,
            spec.head_dim,
            dtype=self.kv_cache_dtype,
            device=model.device,
        )
        self.allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, max_running_requests, max_num_batched_tokens)
        # MoE: every forward records its experts per KV slot (rollout routing replay).
        self.routing = (
            RoutingStore(spec, num_blocks * block_size, block_size, model.device) if spec.is_moe else None
        )
        self.graphs = (
            DecodeGraphs(
                model,
                self.kv_cache,
                max_bs=min(cuda_graph_max_bs or 256, max_running_requests),
                max_blocks=-(-self.context_length // block_size),
                scratch_block=num_blocks,
            )
            if graphs
            else None
        )
        if self.graphs is not None and not batch_invariant.enabled():
            # (In deterministic mode decode runs eagerly: capture lazily if it is ever left.)
            seconds = self.graphs.capture_all()
            log.info("captured %d decode CUDA graphs in %.2f s", len(self.graphs.captured), seconds)
        self.runner = ModelRunner(model, self.kv_cache, self.routing, self.graphs)
        generator = torch.Generator(device=model.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        self.sampler = Sampler(self.eos_token_ids, generator)
        if overlap_schedule and spec.is_moe:
            raise ValueError(
                "overlap_schedule needs a dense model: an MoE step reads its expert counts on the host"
            )
        self.overlap = (
            model.device.type == "cuda" if overlap_schedule is None else overlap_schedule
        ) and not spec.is_moe
        self._inflight: InflightStep | None = None
        self._version = WeightVersion() if weight_version is None else WeightVersion.parse(weight_version)
        self._weights = WeightUpdater(model)
        self._groups: dict[str, UpdateGroup] = {}
        self._paused = False
        self._released: dict[str, Any] = {}  # tag -> what is needed to resume it
        self.last_memory_release: dict[str, int] = {}  # tag -> bytes freed (CUDA only)
        self._requests: dict[str, Request] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._counter = itertools.count()
        self.tokens_generated = 0  # output tokens sampled since start (streamed or not)

    # ---- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        return_prompt_logprobs: bool = False,
        top_logprobs_num: int = 0,
        return_routed_experts: bool = False,
        stream: bool = True,
    ) -> str:
        """Queue a request and return its id. Raises ``ValueError`` for input it cannot serve.

        ``stream``: :meth:`step` returns the request's cumulative output after every token it
        gets; with ``False`` only its final output (and its text is decoded once, at the end,
        unless stop strings need it earlier: decoding the whole output every step for every
        request was the largest host cost of a long rollout).

        ``return_prompt_logprobs`` computes the whole prompt (no prefix reuse for it) and reports
        the log-probability of each prompt token after the first, under the raw model.
        ``return_routed_experts`` (MoE only): the final output carries the experts of every token
        (``RequestOutput.routed_experts``).
        """
        self._check_resident("generate")
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        self._check_sampling(params)
        for name, flag in (
            ("return_prompt_logprobs", return_prompt_logprobs),
            ("return_routed_experts", return_routed_experts),
            ("stream", stream),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r:.40}")
        if isinstance(top_logprobs_num, bool) or not isinstance(top_logprobs_num, int):
            raise ValueError(f"top_logprobs_num must be an integer, got {top_logprobs_num!r:.40}")
        if not 0 <= top_logprobs_num <= self.vocab_size:
            raise ValueError(
                f"top_logprobs_num must be in [0, {self.vocab_size}] (the vocabulary), got {top_logprobs_num}"
            )
        index = next(self._counter)
        rid = str(index) if request_id is None else str(request_id)
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        ids = self._check_prompt(prompt_ids)
        capacity = self.allocator.num_blocks * self.allocator.block_size
        if len(ids) + 1 > capacity:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the KV cache holds {capacity} tokens "
                f"({self.allocator.num_blocks} blocks of {self.allocator.block_size}): raise num_blocks"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("sampling_params.stop (stop strings) needs an engine with a tokenizer")
        if return_routed_experts and self.routing is None:
            raise ValueError("return_routed_experts needs an MoE model; this one is dense")
        req = Request(
            request_id=rid,
            prompt_ids=ids,
            sampling_params=params,
            weight_version=self._version,
            return_prompt_logprobs=return_prompt_logprobs,
            top_logprobs_num=top_logprobs_num,
            arrival_index=index,
            return_routed_experts=return_routed_experts,
            stream=stream,
        )
        if self.routing is not None and return_routed_experts:
            req.routed_experts = self.routing.new_buffer(len(ids) + 64)
        # Nothing to generate: answered without running (as SGLang does), unless the prompt's
        # logprobs or routing are wanted; those need one forward, so the request is kept then.
        if params.max_new_tokens == 0 and not (return_prompt_logprobs or return_routed_experts):
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
        self._drain()
        aborted = self.scheduler.abort(request_id)
        for req in aborted:
            self._requests.pop(req.request_id, None)
            ensure_text(req, self.tokenizer)
            self._pending_outputs.append(RequestOutput.of(req))
        return [r.request_id for r in aborted]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return outputs of requests that got a token or finished.

        With the overlapped schedule a decode step's tokens are reported by the next ``step``
        (the one that queues the following forward first)."""
        if self.overlap and not self._paused and not self._released:
            batch = plan_ahead(self.scheduler, self._inflight)
            if batch is not None:
                prev = self._inflight
                self._inflight = launch_ahead(self.runner, self.sampler, batch, prev, self._version)
                if prev is not None:
                    self._resolve(prev)
                outputs, self._pending_outputs = self._pending_outputs, []
                return outputs
        self._drain()
        outputs, self._pending_outputs = self._pending_outputs, []
        if self._paused or not self.has_unfinished():
            return outputs  # paused: no forward; in-place paused requests keep their state
        self._check_resident("step")
        sched = self.scheduler.schedule()
        for req in sched.out_of_capacity:
            self._finish(req, FinishReason("length", matched=len(req.output_ids)))
            outputs.append(RequestOutput.of(req))
        if not sched.batch:
            return outputs
        result = self.runner.run(sched.batch)
        if self.routing is not None:
            self.routing.after_forward(sched.batch, sched.preempted)
        sampling: list[tuple[int, ScheduledRequest]] = []
        for i, item in enumerate(sched.batch):
            req = item.request
            if req.return_prompt_logprobs:
                self._record_prompt_logprobs(req, item.num_tokens, result.all_logits[i])
            if item.completes_prompt:
                sampling.append((i, item))
            req.num_computed_tokens += item.num_tokens
            req.weight_version = self._version
            self.allocator.mark_computed(req)
        if sampling:
            rows = torch.tensor([i for i, _ in sampling], device=result.last_logits.device)
            reqs = [item.request for _, item in sampling]
            sampled = self.sampler.sample(result.last_logits[rows], reqs, [r.top_logprobs_num for r in reqs])
            for req, tok, lp, top in zip(reqs, sampled.token_ids, sampled.logprobs, sampled.top_logprobs):
                if req.sampling_params.max_new_tokens == 0:  # only prompt logprobs were wanted
                    self._finish(req, FinishReason("length", matched=0))
                elif (reason := self._append_token(req, tok, lp, top)) is not None:
                    self._finish(req, reason)
                if req.stream or req.is_finished:
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
        if self._paused:
            raise EngineStateError("generation is paused: call continue_generation() first")
        ids = [self.add_request(p, sp, stream=False) for p, sp in zip(prompts, params_list)]
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
        self._drain()
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

    # ---- pause and memory ----------------------------------------------------------------------

    @property
    def is_paused(self) -> bool:
        return self._paused

    def pause_generation(self, mode: Literal["abort", "in_place"] = "abort") -> None:
        """Stop scheduling. ``abort`` ends every request (reason ``abort``, partial outputs kept,
        reported by the next ``step``); ``in_place`` keeps them and their KV for
        ``continue_generation``. While paused ``step`` runs no forward."""
        if mode not in ("abort", "in_place"):
            raise ValueError(f"pause mode must be 'abort' or 'in_place', got {mode!r}")
        self._paused = True
        self._drain()
        if mode == "abort":
            self.abort()

    def continue_generation(self) -> None:
        self._paused = False

    def release_memory_occupation(self, tags: Sequence[str] | None = MEMORY_TAGS) -> None:
        """Free GPU memory by tag when idle: ``kv_cache`` drops the K/V tensors (prefix cache
        flushed), ``weights`` moves the parameters to (pinned) CPU memory. Already released
        tags are skipped. Raises ``EngineStateError`` while requests are running or waiting."""
        tags = self._check_tags(tags)
        self._drain()  # the step in flight still writes the K/V cache
        if self.has_unfinished():
            raise EngineStateError(
                f"cannot release memory with {len(self.scheduler.running)} running and "
                f"{len(self.scheduler.waiting)} waiting requests: abort them or let them finish"
            )
        cuda = self.model.device.type == "cuda"
        if self.graphs is not None:
            self.graphs.reset()  # they hold the addresses of what is released; recaptured on use
        for tag in tags:
            if tag in self._released:
                continue
            before = torch.cuda.memory_allocated() if cuda else 0
            if tag == "kv_cache":
                self.allocator.reset_prefix_cache()
                self._released[tag] = [t.shape for t in self.kv_cache.k]
                self.kv_cache.k, self.kv_cache.v = [], []
            else:
                pack_projections(self.model, on=False)  # else the packed copies keep the memory
                self._released[tag] = offload_parameters(self.model)
            if cuda:
                torch.cuda.empty_cache()
                self.last_memory_release[tag] = before - torch.cuda.memory_allocated()

    def resume_memory_occupation(self, tags: Sequence[str] | None = MEMORY_TAGS) -> None:
        """Bring back what ``release_memory_occupation`` freed (weights bitwise identical)."""
        for tag in self._check_tags(tags):
            saved = self._released.pop(tag, None)
            if saved is None:
                continue
            if tag == "kv_cache":
                dt, dev = self.kv_cache_dtype, self.model.device
                self.kv_cache.k = [torch.zeros(shape, dtype=dt, device=dev) for shape in saved]
                self.kv_cache.v = [torch.zeros(shape, dtype=dt, device=dev) for shape in saved]
            else:
                restore_parameters(self.model, saved)
                if self._pack:
                    pack_projections(self.model)

    @property
    def released_tags(self) -> tuple[str, ...]:
        return tuple(self._released)

    @staticmethod
    def _check_tags(tags: Sequence[str] | None) -> tuple[str, ...]:
        tags = MEMORY_TAGS if tags is None else tuple(tags)
        bad = [t for t in tags if t not in MEMORY_TAGS]
        if bad:
            raise ValueError(f"unknown memory tags {bad}: use {list(MEMORY_TAGS)}")
        return tags

    def _check_resident(self, what: str) -> None:
        if self._released:
            raise EngineStateError(
                f"cannot {what}: memory is released ({', '.join(self._released)}); "
                "call resume_memory_occupation() first"
            )

    # ---- admission checks ----------------------------------------------------------------------

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt as a list of ints, each a token of the vocabulary, leaving room in the context."""
        if not hasattr(prompt_ids, "__len__"):
            prompt_ids = list(prompt_ids)
        if len(prompt_ids) >= self.context_length:  # before converting: it may be huge
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but the context length is {self.context_length}: "
                "leave room for at least one generated token"
            )
        ids = []
        for t in prompt_ids:
            # operator.index: ints, NumPy and 0-d torch integers; not floats or strings.
            try:
                if isinstance(t, bool):
                    raise TypeError
                ids.append(operator.index(t))
            except TypeError:
                raise ValueError(f"prompt token ids must be integers, got {t!r:.40}") from None
        if not ids:
            raise ValueError("the prompt is empty: give at least one token id")
        bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < self.vocab_size]
        if bad:
            i, t = bad[0]
            raise ValueError(
                f"prompt token id {t} at position {i} is outside the vocabulary [0, {self.vocab_size})"
                + (f" ({len(bad)} bad ids in all)" if len(bad) > 1 else "")
            )
        return ids

    def _check_sampling(self, params: SamplingParams) -> None:
        """What ``SamplingParams`` cannot check without the model: token ids in the vocabulary, and
        ``min_new_tokens`` leaving some token to sample (banning every one makes the sampled
        distribution NaN)."""
        out_of_vocab = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if out_of_vocab:
            raise ValueError(
                f"sampling_params.stop_token_ids: {out_of_vocab[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        if params.min_new_tokens > 0:
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            if len({t for t in banned if 0 <= t < self.vocab_size}) >= self.vocab_size:
                raise ValueError(
                    "sampling_params.min_new_tokens bans every token of the vocabulary "
                    "(stop_token_ids and EOS cover it): nothing could be sampled"
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

    def _drain(self) -> None:
        """Read the step in flight, if any: its outputs join those the next ``step`` reports."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            self._resolve(inflight)

    def _resolve(self, inflight: InflightStep) -> None:
        """Append an overlapped step's tokens (waiting for them). Requests finished or aborted
        since it was queued are skipped: a finished request's extra row is dropped."""
        sampled = inflight.sample.result()
        for req, tok, lp, top in zip(
            inflight.requests, sampled.token_ids, sampled.logprobs, sampled.top_logprobs
        ):
            if req.status != RequestStatus.RUNNING:
                continue
            reason = self._append_token(req, tok, lp, top)
            self.allocator.mark_computed(req)  # only now is the block's last token id known
            if reason is not None:
                self._finish(req, reason)
            if req.stream or req.is_finished:
                self._pending_outputs.append(RequestOutput.of(req))

    def _append_token(
        self, req: Request, token: int, logprob: float, top: list[tuple[int, float]]
    ) -> FinishReason | None:
        """Append a sampled token; return why ``req`` must now finish (the caller finishes it)."""
        self.tokens_generated += 1
        reason = append_token(
            req,
            token,
            logprob,
            top,
            eos_token_ids=self.eos_token_ids,
            tokenizer=self.tokenizer,
            context_length=self.context_length,
        )
        return reason

    def _finish(self, req: Request, reason: FinishReason) -> None:
        ensure_text(req, self.tokenizer)  # a non-streamed request's text, decoded once at the end
        self.scheduler.finish(req, reason)
        self._requests.pop(req.request_id, None)

"""``Engine``: the inference core (no HTTP, no RL) over the shared model and a paged KV cache.

Built from an ``EngineConfig`` (``miles.config``: the one declaration of the engine's settings,
with SGLang's names) plus what is not a setting: the model, the tokenizer, and the KV cache's size
when the caller computed it from the memory. Drive it with ``add_request`` + ``step``
(continuous batching; each step runs one forward and reports the requests that got a token or
finished) or with ``generate`` (loops ``step`` until every given prompt is done). Not
thread-safe: one caller drives it.

RL hooks (all synchronous, from the driving thread), with SGLang's names: weight updates
(in-process tensors, whole or in buckets; a checkpoint on disk; a torch.distributed broadcast from
the trainer), each bumping ``weight_version`` and flushing the prefix cache;
``pause_generation`` (``abort``, ``retract``, ``in_place``)/``continue_generation``;
``release_memory_occupation``/``resume_memory_occupation`` by tag (``weights``, ``kv_cache``);
``get_weights_by_name``. Every output token carries the weight version that sampled it
(``RequestOutput.output_weight_versions``), so a request that spans an update says at which
token the weights changed. How tensors are checked and applied is
``miles.engine.weight_load``; where they come from (disk, a broadcast group),
``miles.engine.weight_sources``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from miles.config import EngineConfig
from miles.engine.cuda_graph import DecodeGraphs
from miles.engine.kv_cache import BlockAllocator, KVCache
from miles.engine.model_runner import ModelRunner, ScheduledRequest
from miles.engine.overlap import InflightStep, launch_ahead, plan_ahead
from miles.engine.request import FinishReason, Request, RequestOutput, RequestStatus
from miles.engine.routing import RoutingStore
from miles.engine.sampler import Sampler
from miles.engine.scheduler import Scheduler
from miles.engine.stopping import append_token, ensure_text
from miles.engine.weight_load import (
    WeightUpdateError,
    WeightUpdater,
    offload_parameters,
    parse_weight_version,
    restore_parameters,
)
from miles.engine.weight_sources import (
    UpdateGroup,
    broadcast_receive,
    init_custom_process_group,
    read_checkpoint_tensors,
)
from miles.kernels import batch_invariant
from miles.models.layers import pack_projections, use_inference_kernels
from miles.models.transformer import CausalLM
from miles.types import SamplingParams, WeightVersion

log = logging.getLogger(__name__)


class EngineStateError(RuntimeError):
    """The engine cannot do this now (busy, paused, memory released, ...); the message says why."""


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
PauseMode = Literal["abort", "retract", "in_place"]
PAUSE_MODES: tuple[PauseMode, ...] = ("abort", "retract", "in_place")


class Engine:
    """Continuous-batching generation for one ``CausalLM``, as ``config`` says.

    The KV cache is allocated up front: ``num_blocks`` blocks of ``config.page_size`` tokens, or
    enough blocks for ``config.max_total_tokens`` (give one of the two). ``eos_token_ids``
    default to the model config's plus the tokenizer's EOS. ``config.context_length`` (default:
    the model's ``max_position_embeddings``) bounds prompt plus output. A tokenizer (anything with
    ``decode(ids) -> str``) is needed for stop strings and ``text`` in outputs.
    ``config.random_seed`` seeds the generator of unseeded requests. ``weight_version`` (default
    ``"0"``) is the version of the weights given; every output reports the version it was
    generated under. :attr:`config` is the configuration it runs with, derived values filled in.

    The overlapped schedule (see ``miles.engine.overlap``) queues each decode step before reading
    the previous one's tokens: on for dense models on CUDA unless
    ``config.disable_overlap_schedule``, off on the CPU where it gains nothing; MoE models never
    overlap (their steps read expert counts on the host). ``overlap_schedule`` forces it on or
    off (tests run it on the CPU).

    Options the engine does not implement (``EngineConfig.unimplemented``) raise ``ValueError``;
    so does ``config.enable_deterministic_inference`` unless the batch-invariant kernels are on
    (``miles.kernels.batch_invariant``: a process-wide switch, the caller's to set first).
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        *,
        num_blocks: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        kv_dtype: torch.dtype | None = None,
        weight_version: str | int | None = None,
        overlap_schedule: bool | None = None,
    ) -> None:
        config = EngineConfig() if config is None else config
        problems = config.unimplemented()
        if problems:
            raise ValueError(f"the built-in engine does not implement {'; '.join(problems)}")
        if config.enable_deterministic_inference and not batch_invariant.enabled():
            raise ValueError(
                "enable_deterministic_inference needs the batch-invariant kernels, which are "
                "process-wide: call miles.kernels.batch_invariant.set_batch_invariant(True) first"
            )
        block_size = config.page_size
        if (num_blocks is None) == (config.max_total_tokens is None):
            raise ValueError(
                "size the KV cache with num_blocks or config.max_total_tokens (one of the two), got "
                f"num_blocks={num_blocks} and max_total_tokens={config.max_total_tokens}"
            )
        if num_blocks is None:
            assert config.max_total_tokens is not None
            num_blocks = -(-config.max_total_tokens // block_size)
        spec = model.spec
        self.model = model.eval()
        use_inference_kernels(model)
        self._pack = model.device.type == "cuda"  # fewer, larger GEMMs: see pack_projections
        if self._pack:
            pack_projections(model)
        self.tokenizer = tokenizer
        self.vocab_size = spec.vocab_size
        self.context_length = config.context_length or spec.max_position_embeddings
        self.config = dataclasses.replace(
            config,
            context_length=self.context_length,
            max_total_tokens=config.max_total_tokens or num_blocks * block_size,
        )
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
            and not config.disable_cuda_graph
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
        self.allocator = BlockAllocator(num_blocks, block_size, not config.disable_radix_cache)
        self.scheduler = Scheduler(self.allocator, config.max_running_requests, config.max_prefill_tokens)
        # MoE: every forward records its experts per KV slot (rollout routing replay).
        self.routing = (
            RoutingStore(spec, num_blocks * block_size, block_size, model.device) if spec.is_moe else None
        )
        self.graphs = (
            DecodeGraphs(
                model,
                self.kv_cache,
                max_bs=min(config.cuda_graph_max_bs, config.max_running_requests),
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
        if config.random_seed is not None:
            generator.manual_seed(config.random_seed)
        else:
            generator.seed()
        self.sampler = Sampler(self.eos_token_ids, generator)
        if overlap_schedule and spec.is_moe:
            raise ValueError(
                "overlap_schedule needs a dense model: an MoE step reads its expert counts on the host"
            )
        if overlap_schedule is None:
            overlap_schedule = model.device.type == "cuda" and not config.disable_overlap_schedule
        self.overlap = overlap_schedule and not spec.is_moe
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
                elif (reason := self._append_token(req, tok, lp, top, self._version)) is not None:
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

    def pause_generation(self, mode: PauseMode = "abort") -> None:
        """Stop scheduling (SGLang's three modes). While paused ``step`` runs no forward.

        - ``abort`` ends every request (reason ``abort``, partial outputs kept, reported by the
          next ``step``);
        - ``retract`` moves every running request back to ``waiting`` and frees its KV blocks,
          as a preemption does: after ``continue_generation`` its prompt and the output sampled
          so far are prefilled again, under whatever weights are loaded then, and it goes on to
          finish normally (nothing sampled is lost, and every token keeps the version that
          sampled it). A MoE request's routing record is taken again by that recompute;
        - ``in_place`` keeps every request and its K/V for ``continue_generation`` (K/V
          computed under the weights loaded before a later update stay in use).

        The overlapped step in flight, if any, is read first: its tokens are appended (under
        the version they were launched with) before any request is aborted or retracted."""
        if mode not in PAUSE_MODES:
            raise ValueError(
                f"pause mode must be one of {', '.join(map(repr, PAUSE_MODES))}, got {mode!r:.40}"
            )
        self._paused = True
        self._drain()
        if mode == "abort":
            self.abort()
        elif mode == "retract":
            retracted = self.scheduler.retract()
            if self.routing is not None:
                self.routing.forget(retracted)

    def continue_generation(self) -> None:
        """Schedule again: requests paused in place decode on from their K/V, retracted ones
        are prefilled again first (under the weights loaded now)."""
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

    # ---- weights (SGLang's update_weights_* family) ---------------------------------------------
    # Every update is atomic: its arguments (weight_version, flush_cache) and every tensor are
    # validated first (weight_load), then the weights are copied, the prefix cache flushed unless
    # told not to and weight_version set. A refused update raises WeightUpdateError (a ValueError)
    # and leaves weights, version and cache exactly as they were. An overlapped step in flight is
    # read first, so its tokens are reported under the weights they were sampled with.

    @property
    def weight_version(self) -> str:
        """The version of the weights in use (SGLang's ``weight_version``, a decimal string)."""
        return str(self._version)

    def get_weight_version(self) -> str:
        return self.weight_version

    def update_weights_from_tensors(
        self,
        named_tensors: Iterable[Any],
        weight_version: str | int | None = None,
        flush_cache: bool = True,
    ) -> None:
        """Set parameters from ``(HF name, tensor)`` pairs (or a sequence of buckets of pairs).

        All-or-nothing: an unknown name, a wrong shape, a non-floating dtype or a NaN/infinite
        value raises ``WeightUpdateError`` naming the tensor, and no parameter changes. Floating
        tensors are cast to the model's dtype. A subset of the parameters may be given.
        ``weight_version`` defaults to the current one plus one; a bad one is refused first.
        """
        version = self._start_update(weight_version, flush_cache)
        if self._weights.in_session:
            raise WeightUpdateError("a bucketed weight update is in progress: commit or abort it first")
        self._weights.apply(named_tensors)
        self._finish_update(version, flush_cache)

    def begin_weight_update(self) -> None:
        """Start a bucketed update: ``update_weights_bucket`` stages, ``commit`` applies all."""
        self._check_updatable()
        self._weights.begin()

    def update_weights_bucket(self, named_tensors: Iterable[Any]) -> None:
        """Validate and stage one bucket (a copy: the caller may reuse its buffers).

        A bad bucket raises ``WeightUpdateError``, stages nothing, and makes ``commit`` refuse:
        the caller then calls ``abort_weight_update``. So does a bucket refused because the
        weights were released meanwhile.
        """
        try:
            self._check_updatable()
        except EngineStateError as e:
            self._weights.mark_failed(str(e))
            raise
        self._weights.stage(named_tensors)

    def commit_weight_update(self, weight_version: str | int | None = None, flush_cache: bool = True) -> None:
        """Apply every staged bucket at once, then flush the prefix cache and set the version.

        A bad ``weight_version`` refuses the commit and keeps the session (commit again or abort)."""
        version = self._start_update(weight_version, flush_cache)
        self._weights.commit()
        self._finish_update(version, flush_cache)

    def abort_weight_update(self) -> None:
        """Drop the staged buckets; the weights stay as they were."""
        self._weights.abort()

    def update_weights_from_disk(
        self, model_path: str, weight_version: str | int | None = None, flush_cache: bool = True
    ) -> None:
        """Load every parameter from an HF directory (or GGUF) and apply it atomically.

        The checkpoint must hold the whole model (missing or unexpected tensors are refused); an
        unreadable one (truncated, bad header, GGUF garbage, no ``config.json``) is refused too.
        """
        version = self._start_update(weight_version, flush_cache)
        if not isinstance(model_path, str) or not model_path:
            raise WeightUpdateError(f"model_path must be a non-empty string, got {model_path!r}")
        tensors = read_checkpoint_tensors(self.model, model_path)
        self._weights.apply(tensors)
        self._finish_update(version, flush_cache)

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "gloo",
    ) -> None:
        """Join the trainer's broadcast group as rank ``rank_offset`` (the trainer is rank 0).

        The rendezvous blocks the calling thread; the HTTP server runs it on a worker thread
        (``init_custom_process_group``) and registers the result with
        :meth:`add_weights_update_group`, so generation goes on meanwhile."""
        if group_name in self._groups:
            raise ValueError(f"weights update group {group_name!r} already exists")
        self.add_weights_update_group(
            group_name,
            init_custom_process_group(
                master_address, master_port, rank_offset, world_size, group_name, backend
            ),
        )

    def has_weights_update_group(self, group_name: str) -> bool:
        """Whether a group of that name is registered (checked before a rendezvous starts)."""
        return group_name in self._groups

    def add_weights_update_group(self, group_name: str, group: UpdateGroup) -> None:
        """Register a group joined elsewhere (on another thread) under ``group_name``; a name
        already in use is refused and the new group shut down."""
        if group_name in self._groups:
            if hasattr(group.backend, "shutdown"):
                group.backend.shutdown()
            raise ValueError(f"weights update group {group_name!r} already exists")
        self._groups[group_name] = group

    def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        weight_version: str | int | None = None,
        flush_cache: bool = True,
    ) -> None:
        """Receive each tensor by broadcast from rank 0 of ``group_name``, then apply atomically.

        The version, names, dtypes and shapes are checked (against the model's parameters) before
        anything is received, so a refused update allocates and receives nothing; received tensors
        are checked (finite values) before any is applied.
        """
        group = self._groups.get(group_name) if isinstance(group_name, str) else None
        if group is None:
            raise ValueError(f"no weights update group {group_name!r}: call init_weights_update_group first")
        version = self._start_update(weight_version, flush_cache)
        if self._weights.in_session:
            raise WeightUpdateError("a bucketed weight update is in progress: commit or abort it first")
        received = broadcast_receive(group, names, dtypes, shapes, self._weights)
        self._weights.apply(received)
        self._finish_update(version, flush_cache)

    def destroy_weights_update_group(self, group_name: str) -> None:
        """Forget the group (unknown names are ignored, as SGLang callers expect)."""
        group = self._groups.pop(group_name, None)
        if group is not None and hasattr(group.backend, "shutdown"):
            group.backend.shutdown()

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        """SGLang's weight read-back: the first ``truncate_size`` rows of parameter ``name`` (an
        HF name; a tied ``lm_head.weight`` too) as nested float lists. Trainers use it to check
        a weight sync."""
        if "weights" in self._released:
            raise EngineStateError("weights are released: resume_memory_occupation(['weights']) first")
        params = dict(self.model.named_parameters(remove_duplicate=False))
        if name not in params:
            raise ValueError(f"no parameter named {name!r}")
        rows: list[Any] = params[name].detach()[:truncate_size].float().cpu().tolist()
        return rows

    def _check_updatable(self) -> None:
        self._drain()
        if "weights" in self._released:
            raise EngineStateError("weights are released: resume_memory_occupation(['weights']) first")

    def _start_update(self, weight_version: str | int | None, flush_cache: bool) -> WeightVersion:
        """The engine ready for an update and the version it will set, both checked before
        anything changes."""
        self._check_updatable()
        if not isinstance(flush_cache, bool):
            raise WeightUpdateError(f"flush_cache must be true or false, got {flush_cache!r}")
        return parse_weight_version(weight_version, self._version)

    def _finish_update(self, version: WeightVersion, flush_cache: bool) -> None:
        """Only after the weights changed: nothing here can fail."""
        if flush_cache:
            # K/V computed under the old weights must not serve new requests. Running (paused
            # in place) requests keep their own blocks; only the prefix map is dropped.
            self.allocator.reset_prefix_cache()
        self._version = version

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
            reason = self._append_token(req, tok, lp, top, inflight.version)
            self.allocator.mark_computed(req)  # only now is the block's last token id known
            if reason is not None:
                self._finish(req, reason)
            if req.stream or req.is_finished:
                self._pending_outputs.append(RequestOutput.of(req))

    def _append_token(
        self,
        req: Request,
        token: int,
        logprob: float,
        top: list[tuple[int, float]],
        version: WeightVersion,
    ) -> FinishReason | None:
        """Append a token sampled under ``version``; return why ``req`` must now finish (the
        caller finishes it)."""
        self.tokens_generated += 1
        reason = append_token(
            req,
            token,
            logprob,
            top,
            weight_version=version.step,
            eos_token_ids=self.eos_token_ids,
            tokenizer=self.tokenizer,
            context_length=self.context_length,
        )
        return reason

    def _finish(self, req: Request, reason: FinishReason) -> None:
        ensure_text(req, self.tokenizer)  # a non-streamed request's text, decoded once at the end
        self.scheduler.finish(req, reason)
        self._requests.pop(req.request_id, None)

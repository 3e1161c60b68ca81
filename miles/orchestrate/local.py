"""The embedded placement: trainer and engine in one process, on one device (CPU or one GPU).

With ``--advantage-estimator ppo`` the trainer also holds the critic (:mod:`miles.train.critic`).

Weights go from trainer to engine in memory (HF-named buckets). With ``--offload-rollout`` the
engine releases its memory (weights and KV cache) while the trainer works, and with
``--offload-train`` the trainer sleeps (state in CPU memory) while the engine generates; both are
on with ``--colocate`` or ``--offload``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from miles.buffer.batching import build_train_batch
from miles.config import MilesConfig
from miles.engine.async_engine import AsyncEngine
from miles.engine.client import LocalEngineClient
from miles.engine.engine import Engine
from miles.engine.kv_cache import available_memory_bytes, kv_bytes_per_token, kv_capacity_tokens
from miles.kernels import batch_invariant
from miles.models.loading import load_model, load_tokenizer
from miles.models.spec import ModelSpec
from miles.rollout.dataset import PromptDataset, load_eval_datasets
from miles.rollout.manager import RolloutManager
from miles.train.checkpoint import load_checkpoint, save_checkpoint
from miles.train.critic import build_critic
from miles.train.parallelize import parallelize
from miles.train.rl_step import rl_step
from miles.train.trainer import Trainer
from miles.train.trainer_sleep import awake
from miles.train.weight_export import iter_weight_buckets, save_trainer_hf
from miles.types import Group
from miles.utils.progress import announce


def compute_dtype(config: MilesConfig, device: torch.device) -> str:
    """The engine's (and the trainer's compute) dtype: fp32 on CPU, else ``--dtype`` (bf16 by default)."""
    m = config.model
    return "float32" if device.type == "cpu" else (m.dtype if m.dtype != "auto" else "bfloat16")


def init_single_process_group(device: torch.device) -> None:
    """A one-rank default process group (NCCL on CUDA, gloo on CPU) for FSDP2 in one process;
    a group that already exists is kept."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def kv_demand(config: MilesConfig, spec: ModelSpec, datasets: list[PromptDataset]) -> tuple[int, int]:
    """``(sequences, seq_len)`` of one rollout step at once: every sample of the batch (or of an
    evaluation), each the longest prompt plus the longest response."""
    r, e = config.rollout, config.engine
    context = e.context_length or spec.max_position_embeddings
    response = max(r.rollout_max_response_len or context, r.eval_max_response_len or 0)
    seq_len = min(context, max(d.longest_prompt_len for d in datasets) + response)
    prompts = max(r.rollout_batch_size or 1, r.over_sampling_batch_size or 0)
    sequences = max(prompts * max(r.n_samples_per_prompt, 1), r.n_samples_per_eval_prompt or 1)
    return sequences, seq_len


def default_kv_tokens(
    config: MilesConfig, spec: ModelSpec, dtype: torch.dtype, demand: tuple[int, int], device: torch.device
) -> int:
    """KV slots for :func:`kv_demand`, capped at ``--mem-fraction-static`` (default 0.4) of the
    memory available now on ``device``: sizing from the model's context length instead asks 24 GB
    for SmolLM2 on a laptop."""
    per_token = kv_bytes_per_token(spec.num_hidden_layers, spec.num_key_value_heads, spec.head_dim, dtype)
    return kv_capacity_tokens(
        bytes_per_token=per_token,
        sequences=demand[0],
        seq_len=demand[1],
        available_bytes=available_memory_bytes(device),
        mem_fraction=config.engine.mem_fraction_static or 0.4,
    )


def build_trainer(config: MilesConfig, device: torch.device, *, fsdp: bool) -> Trainer:
    """Policy (fp32 master weights), optional reference model and critic, as one ``Trainer``.

    ``fsdp``: shard the policy with FSDP2 over the default process group (which must exist),
    computing in :func:`compute_dtype`; otherwise a plain module (one process)."""
    m, t, a = config.model, config.train, config.algo
    assert m.hf_checkpoint is not None
    dtype = compute_dtype(config, device)
    announce(f"loading the policy {m.hf_checkpoint} (float32 master weights, {device.type}) ...")
    policy = load_model(m.hf_checkpoint, dtype="float32", device=device)
    if fsdp:
        policy = parallelize(
            policy,
            param_dtype=getattr(torch, dtype),
            activation_checkpointing=t.gradient_checkpointing,
            expert_parallel_size=t.expert_model_parallel_size,
        )
    ref = None
    if a.use_kl_loss or a.kl_coef > 0:
        announce(f"loading the reference model {m.ref_load or m.hf_checkpoint} ({dtype}) ...")
        ref = load_model(m.ref_load or m.hf_checkpoint, dtype=dtype, device=device).eval()
    critic = None
    if a.uses_critic:
        assert m.critic_load is not None  # required with --advantage-estimator ppo (config validation)
        announce(f"loading the critic {m.critic_load} (float32) ...")
        critic = build_critic(m.critic_load, t, a, device)
    return Trainer(
        policy,
        t,
        a,
        device,
        dtype=getattr(torch, dtype),
        temperature=config.rollout.rollout_temperature,
        steps_per_rollout=config.rollout.num_steps_per_rollout or 1,
        use_rollout_routing_replay=config.use_rollout_routing_replay,
        ref_model=ref,
        critic=critic,
    )


@dataclass
class LocalPlacement:
    """Every component of one embedded run, built from the configuration."""

    config: MilesConfig
    trainer: Trainer
    engine: AsyncEngine
    tokenizer: Any
    dataset: PromptDataset
    eval_datasets: dict[str, PromptDataset]
    manager: RolloutManager
    device: torch.device

    @classmethod
    def build(cls, config: MilesConfig, args: Any, *, mixed_precision: bool | None = None) -> LocalPlacement:
        """``mixed_precision`` (default: on CUDA): the policy is FSDP2-wrapped on a one-rank group
        with fp32 master weights and compute in the engine's dtype, so the trainer runs the very
        arithmetic the engine runs (required for true-on-policy mode on a GPU)."""
        m, e = config.model, config.engine
        assert m.hf_checkpoint is not None
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Process-wide: the engine's steps (another thread) and the trainer share the kernels.
        # --sglang-enable-deterministic-inference alone also switches them: one process, one set.
        batch_invariant.set_batch_invariant(config.deterministic_mode or e.enable_deterministic_inference)
        dtype = compute_dtype(config, device)
        announce(f"loading the tokenizer of {m.hf_checkpoint} ...")
        tokenizer = load_tokenizer(m.hf_checkpoint)
        fsdp = mixed_precision if mixed_precision is not None else device.type == "cuda"
        if fsdp:
            init_single_process_group(device)
        trainer = build_trainer(config, device, fsdp=fsdp)
        announce(f"loading the engine's copy of {m.hf_checkpoint} ({dtype}) ...")
        engine_model = load_model(m.hf_checkpoint, dtype=dtype, device=device)
        r3 = config.use_rollout_routing_replay
        if r3 and not engine_model.spec.is_moe:
            raise ValueError("--use-rollout-routing-replay needs an MoE model; this one is dense")
        announce(f"reading the prompts {config.rollout.prompt_data or '(replayed rollouts)'} ...")
        dataset = PromptDataset.from_config(config.rollout, tokenizer)
        evals = load_eval_datasets(config.rollout.eval_datasets, config.rollout, tokenizer)
        demand = kv_demand(config, engine_model.spec, [dataset, *evals.values()])
        max_tokens = e.max_total_tokens or default_kv_tokens(
            config, engine_model.spec, engine_model.dtype, demand, device
        )
        logging.getLogger("miles.engine").setLevel(e.log_level.upper())  # the engine's own log level
        engine = Engine(engine_model, tokenizer, dataclasses.replace(e, max_total_tokens=max_tokens))
        async_engine = AsyncEngine(engine).start()
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        manager = RolloutManager(
            config.rollout,
            dataset,
            LocalEngineClient(async_engine),
            args=args,
            concurrency=e.server_concurrency,
            stop_token_ids=eos,
            routed_experts_top_k=engine_model.spec.num_experts_per_tok if r3 else None,
        )
        return cls(config, trainer, async_engine, tokenizer, dataset, dict(evals), manager, device)

    def _engine_memory(self, release: bool) -> None:
        def call(engine: Engine) -> None:
            (engine.release_memory_occupation if release else engine.resume_memory_occupation)(None)

        asyncio.run(self.engine.call(call))

    def train(self, groups: list[Group], step: int) -> dict[str, float]:
        """The engine gives its memory back (``--offload-rollout``) and the trainer wakes up
        (``--offload-train``) for the trainer's half of the step."""
        p = self.config.placement
        if p.offload_rollout:
            self._engine_memory(release=True)
        if p.offload_train:
            self.trainer.wake_up()
        return rl_step(self.trainer, build_train_batch(groups), group_size=len(groups[0]), step=step)

    def save_checkpoint(self, directory: str, step: int, extra: dict[str, Any]) -> None:
        save_checkpoint(directory, self.trainer, step, extra)  # wakes a sleeping trainer

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        return load_checkpoint(directory, self.trainer)

    def save_hf(self, directory: str) -> None:
        assert self.config.model.hf_checkpoint is not None
        with awake(self.trainer):  # gathered when sharded (one-rank FSDP2 on CUDA)
            save_trainer_hf(self.trainer.model, directory, tokenizer_source=self.config.model.hf_checkpoint)

    def push_weights(self, version: int, *, send: bool = True) -> float:
        """Send the trainer's weights to the engine as ``version`` (unless ``send`` is False:
        ``--update-weights-interval``); returns the seconds the sync took. The engine takes its
        memory back first (``--offload-rollout``) and the trainer sleeps after
        (``--offload-train``): rollout and evaluation come next."""
        p = self.config.placement
        if p.offload_rollout:
            self._engine_memory(release=False)
        seconds = self._push(version) if send else 0.0
        if p.offload_train:
            self.trainer.sleep()
        return seconds

    def _push(self, version: int) -> float:
        start = time.perf_counter()
        dtype = self.engine.engine.model.dtype
        size = self.config.placement.update_weight_buffer_size
        buckets = list(iter_weight_buckets(self.trainer.model, dtype, size))

        def apply(engine: Engine) -> None:
            engine.update_weights_from_tensors(buckets, weight_version=str(version))

        asyncio.run(self.engine.call(apply))
        return time.perf_counter() - start

    def close(self) -> None:
        self.engine.close()
        batch_invariant.set_batch_invariant(False)

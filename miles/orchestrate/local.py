"""The embedded placement: trainer and engine in one process, on one device (CPU or one GPU).

With ``--advantage-estimator ppo`` the trainer also holds the critic (:mod:`miles.orchestrate.ppo`).

Weights go from trainer to engine in memory (HF-named buckets). With ``--offload-rollout`` the
engine releases its memory (weights and KV cache) while the trainer works, and with
``--offload-train`` the trainer sleeps (state in CPU memory) while the engine generates; both are
on with ``--colocate`` or ``--offload``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import torch

from miles.algo.corrections import CorrectionParams
from miles.config import MilesConfig
from miles.engine.async_engine import AsyncEngine
from miles.engine.client import LocalEngineClient
from miles.engine.engine import Engine
from miles.engine.kv_cache import available_memory_bytes, kv_bytes_per_token, kv_capacity_tokens
from miles.kernels import batch_invariant
from miles.models.loading import load_model, load_tokenizer
from miles.models.spec import ModelSpec
from miles.orchestrate.ppo import build_critic, uses_critic
from miles.orchestrate.train_step import compute_dtype, train_on
from miles.rollout.dataset import PromptDataset, load_eval_datasets
from miles.rollout.manager import RolloutManager
from miles.train.checkpoint import load_checkpoint, save_checkpoint
from miles.train.parallelize import apply_activation_checkpointing, parallelize
from miles.train.trainer import Trainer, TrainerConfig
from miles.train.trainer_sleep import awake
from miles.train.weight_sync import iter_weight_buckets, save_trainer_hf
from miles.types import Group
from miles.utils.progress import announce


def trainer_config(config: MilesConfig) -> TrainerConfig:
    """Map the command-line configuration onto the trainer's own (explicitly: no silent defaults)."""
    t, a, r = config.train, config.algo, config.rollout
    correction = "mis" if a.use_mis else "tis" if a.use_tis else "none"
    params = CorrectionParams(
        tis_clip=a.tis_clip,
        tis_clip_low=a.tis_clip_low,
        mis_low=a.mis_token_lower_bound,
        mis_high=a.mis_token_upper_bound,
        mis_seq_low=a.mis_seq_lower_bound if a.mis_seq_level == "geometric" else None,
        mis_seq_high=a.mis_seq_upper_bound if a.mis_seq_level == "geometric" else None,
        mis_veto=a.mis_veto_threshold,
    )
    return TrainerConfig(
        lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_style=t.lr_decay_style,
        lr_decay_steps=t.lr_decay_iters,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        micro_batch_size=t.micro_batch_size,
        max_tokens_per_gpu=t.max_tokens_per_gpu if t.use_dynamic_batch_size else None,
        loss_type=t.loss_type,
        policy_loss="gspo" if a.advantage_estimator == "gspo" else "ppo",
        reduction="token_mean" if t.calculate_per_token_loss else "seq_mean",
        eps_clip=a.eps_clip,
        eps_clip_high=a.eps_clip_high,
        eps_clip_c=a.eps_clip_c,
        use_kl_loss=a.use_kl_loss,
        kl_loss_coef=a.kl_loss_coef,
        kl_loss_type=a.kl_loss_type,
        entropy_coef=a.entropy_coef,
        correction=correction,
        correction_params=params,
        use_rollout_logprobs=a.use_rollout_logprobs,
        routing_replay=config.use_rollout_routing_replay,
        own_routing_replay=t.use_routing_replay,
        moe_aux_loss_coef=t.moe_aux_loss_coeff,
        moe_z_loss_coef=t.moe_z_loss_coeff,
        temperature=r.rollout_temperature,
        gradient_checkpointing=t.gradient_checkpointing,
        optimizer_cpu_offload=t.optimizer_cpu_offload,
        seed=t.seed,
        # slime counts critic-only steps in rollouts; the trainer counts its train_step calls.
        num_critic_only_steps=t.num_critic_only_steps * (r.num_steps_per_rollout or 1),
    )


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
    m = config.model
    assert m.hf_checkpoint is not None
    dtype = compute_dtype(config, device)
    announce(f"loading the policy {m.hf_checkpoint} (float32 master weights, {device.type}) ...")
    policy = load_model(m.hf_checkpoint, dtype="float32", device=device)
    if fsdp:
        policy = parallelize(
            policy,
            param_dtype=getattr(torch, dtype),
            activation_checkpointing=config.train.gradient_checkpointing,
            expert_parallel_size=config.train.expert_model_parallel_size,
        )
    elif config.train.gradient_checkpointing:
        apply_activation_checkpointing(policy)
    ref = None
    if config.algo.use_kl_loss or config.algo.kl_coef > 0:
        announce(f"loading the reference model {m.ref_load or m.hf_checkpoint} ({dtype}) ...")
        ref = load_model(m.ref_load or m.hf_checkpoint, dtype=dtype, device=device).eval()
    if uses_critic(config):
        announce(f"loading the critic {m.critic_load} (float32) ...")
    critic = build_critic(config, device) if uses_critic(config) else None
    return Trainer(policy, trainer_config(config), device, ref_model=ref, critic=critic)


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
        context = e.context_length or engine_model.spec.max_position_embeddings
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
        page = e.page_size or 16
        engine = Engine(
            engine_model,
            tokenizer,
            num_blocks=-(-max_tokens // page),
            block_size=page,
            max_running_requests=e.max_running_requests or 256,
            max_num_batched_tokens=e.max_prefill_tokens or 4096,
            context_length=context,
            enable_prefix_caching=not e.disable_radix_cache,
            seed=e.random_seed,
            cuda_graph_max_bs=e.cuda_graph_max_bs,
            disable_cuda_graph=e.disable_cuda_graph,
            overlap_schedule=False if e.disable_overlap_schedule else None,
        )
        async_engine = AsyncEngine(engine).start()
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        manager = RolloutManager(
            config.rollout,
            dataset,
            LocalEngineClient(async_engine),
            args=args,
            concurrency=e.server_concurrency or 512,
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
        return train_on(self.trainer, self.config, groups, step, self.device)

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
        buckets = list(iter_weight_buckets(self.trainer.model, dtype, 512 * 1024**2))

        def apply(engine: Engine) -> None:
            engine.update_weights_from_tensors(buckets, weight_version=str(version))

        asyncio.run(self.engine.call(apply))
        return time.perf_counter() - start

    def close(self) -> None:
        self.engine.close()
        batch_invariant.set_batch_invariant(False)

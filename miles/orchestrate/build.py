"""What both placements build the same way: the trainer of one rank and the engines' sizes.

The embedded placement (:mod:`miles.orchestrate.local`) and every Ray trainer rank
(:mod:`miles.orchestrate.trainer_worker`) call :func:`build_trainer`; the engines of either
size their KV cache with :func:`default_kv_tokens` for the :func:`kv_demand` the loop computes
from its data.
"""

from __future__ import annotations

import torch

from miles.config import MilesConfig
from miles.engine.kv_cache import available_memory_bytes, kv_bytes_per_token, kv_capacity_tokens
from miles.models.loading import load_model
from miles.models.spec import ModelSpec
from miles.rollout.dataset import PromptDataset
from miles.train.critic import build_critic
from miles.train.parallelize import parallelize
from miles.train.trainer import Trainer
from miles.utils.progress import announce


def compute_dtype(config: MilesConfig, device: torch.device) -> str:
    """The engine's (and the trainer's compute) dtype: fp32 on CPU, else ``--dtype`` (bf16 by default)."""
    m = config.model
    return "float32" if device.type == "cpu" else (m.dtype if m.dtype != "auto" else "bfloat16")


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
    memory available now on ``device``: sizing from the model's context length instead asks
    more than a laptop has for SmolLM2 (docs/architecture.md, "sized from the rollout")."""
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


__all__ = ["build_trainer", "compute_dtype", "default_kv_tokens", "kv_demand"]

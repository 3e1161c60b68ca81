"""The configuration of a Miles run: a tree of frozen dataclasses, one per subsystem.

Three flag layers (DESIGN §3), all generated from the fields below:

- training-backend flags under their usual names (``--lr``, ``--micro-batch-size``, ...);
- engine flags with the prefix ``--sglang-`` and SGLang's names (``EngineConfig``); real SGLang
  options the built-in engine lacks are kept verbatim for ``--rollout-backend sglang``;
- Miles flags with slime/Miles names (``--rollout-batch-size``, ``--advantage-estimator``, ...).

``--config file.yaml`` takes the same keys (flat, ``-`` or ``_``, or nested by section); flags
given on the command line override it. :func:`parse_train_args` parses once, at the edge, and
each component then receives only its own sub-config. Nothing here imports torch or yaml at
import time, so ``miles --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from miles import config_rules as rules
from miles.utils import sglang_options as sgl
from miles.utils.dataclass_flags import (
    ConfigError,
    FieldSpec,
    Parser,
    add_flag,
    check_bounds,
    coerce,
    collect_specs,
    read_yaml_items,
    to_plain,
    unknown_argument_error,
)
from miles.utils.suggest import did_you_mean

__all__ = [
    "SPECS",
    "AlgoConfig",
    "CheckpointConfig",
    "ConfigError",
    "EngineConfig",
    "LogConfig",
    "MilesConfig",
    "ModelConfig",
    "PlacementConfig",
    "RolloutConfig",
    "TrainConfig",
    "add_train_arguments",
    "build_config",
    "config_from_namespace",
    "config_to_yaml",
    "parse_train_args",
]


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A config field: default, help line, and metadata (``ge/gt/le/lt`` bounds, ``slime`` note)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: MappingProxyType(dict(default)), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


class _Section:
    """Base of the sub-configs: freezes mapping and list values too, not just the attributes."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, dict):
                object.__setattr__(self, f.name, MappingProxyType(dict(value)))
            elif isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))


# ruff: noqa: RUF009 -- _f returns a dataclasses.field, which is what a field default should be.


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The policy, reference and critic models."""

    hf_checkpoint: str | None = _f(None, "policy model: a Hugging Face directory or a .gguf file")
    ref_load: str | None = _f(None, "reference model for KL (default: --hf-checkpoint)")
    critic_load: str | None = _f(None, "initial critic (value model) weights; required by ppo")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _f("auto", "bfloat16 on GPU, float32 on CPU")
    trust_remote_code: bool = _f(
        False, "Miles never runs model code shipped with a checkpoint: --trust-remote-code is refused"
    )


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The FSDP2 trainer: optimizer, batching, memory, MoE."""

    train_backend: Literal["fsdp"] = _f("fsdp", "training backend (Miles has FSDP2 only)")
    lr: float = _f(1e-6, "learning rate", gt=0)
    min_lr: float = _f(0.0, "floor of the decayed learning rate", ge=0)
    lr_warmup_iters: int = _f(0, "optimizer steps of linear warm-up", ge=0)
    lr_decay_style: Literal["constant", "cosine", "linear"] = _f(
        "constant",
        "schedule after warm-up",
        slime="Megatron's default is linear; slime scripts pass constant",
    )
    lr_decay_iters: int | None = _f(None, "steps over which lr decays (default: all)", ge=1)
    weight_decay: float = _f(0.1, "AdamW weight decay", ge=0, slime="Megatron 0.01; slime scripts pass 0.1")
    adam_beta1: float = _f(0.9, "Adam beta1", ge=0, lt=1)
    adam_beta2: float = _f(0.98, "Adam beta2", ge=0, lt=1, slime="Megatron 0.999; slime scripts pass 0.98")
    adam_eps: float = _f(1e-8, "Adam epsilon", gt=0)
    clip_grad: float = _f(1.0, "gradient-norm clipping (0 = off)", ge=0)
    seed: int = _f(1234, "random seed of the trainer")
    micro_batch_size: int = _f(1, "samples per micro-batch (unused with dynamic batches)", ge=1)
    global_batch_size: int | None = _f(None, "samples per optimizer step (default: a rollout)", ge=1)
    use_dynamic_batch_size: bool = _f(False, "pack micro-batches up to --max-tokens-per-gpu")
    max_tokens_per_gpu: int | None = _f(None, "token budget of one packed micro-batch", ge=1)
    log_probs_max_tokens_per_gpu: int | None = _f(None, "token budget for log-prob passes", ge=1)
    balance_data: bool = _f(
        True,
        "balance tokens across data-parallel ranks (always on: --no-balance-data is refused)",
        slime="False; Miles always balances",
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass")
    optimizer_cpu_offload: bool = _f(False, "keep the optimizer state on the CPU")
    loss_type: Literal["policy_loss", "sft_loss"] = _f("policy_loss", "loss of the actor")
    calculate_per_token_loss: bool = _f(False, "average over all tokens, not per sample first")
    critic_lr: float | None = _f(None, "critic learning rate (default: --lr)", gt=0)
    critic_lr_warmup_iters: int = _f(0, "critic warm-up steps", ge=0)
    num_critic_only_steps: int = _f(0, "train only the critic for the first N steps", ge=0)
    expert_model_parallel_size: int = _f(1, "expert-parallel size of MoE layers", ge=1)
    moe_aux_loss_coeff: float = _f(
        0.0, "MoE load-balancing loss coefficient", ge=0, aliases=("--moe-aux-loss-coef",)
    )
    moe_z_loss_coeff: float = _f(0.0, "MoE router z-loss coefficient", ge=0, aliases=("--moe-z-loss-coef",))
    use_routing_replay: bool = _f(False, "R2: replay the trainer's own routing")

    @property
    def loss_reduction(self) -> Literal["token_mean", "seq_mean"]:
        """How losses are reduced (a ``LOSS_REDUCTIONS`` name): a mean over every trained token of
        the global batch with ``--calculate-per-token-loss``, else per sample first."""
        return "token_mean" if self.calculate_per_token_loss else "seq_mean"

    @property
    def micro_batch_max_tokens(self) -> int | None:
        """The token budget of one packed micro-batch (``--max-tokens-per-gpu`` with
        ``--use-dynamic-batch-size``); None: ``--micro-batch-size`` sequences per micro-batch."""
        return self.max_tokens_per_gpu if self.use_dynamic_batch_size else None


AdvantageEstimator = Literal[
    "grpo", "gspo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"
]


@dataclass(frozen=True)
class AlgoConfig(_Section):
    """Advantages, policy loss, KL, entropy and off-policy corrections (TIS/MIS)."""

    advantage_estimator: AdvantageEstimator = _f("grpo", "advantage estimator")
    disable_grpo_std_normalization: bool = _f(False, "GRPO: do not divide by the group std")
    disable_rewards_normalization: bool = _f(False, "use raw rewards, no group normalization")
    normalize_advantages: bool = _f(False, "whiten advantages over the batch")
    gamma: float = _f(1.0, "discount factor", ge=0, le=1)
    lambd: float = _f(1.0, "GAE lambda (ppo)", ge=0, le=1)
    eps_clip: float = _f(0.2, "PPO clip: ratio kept in [1 - eps, 1 + eps_high]", ge=0)
    eps_clip_high: float | None = _f(None, "upper clip (clip-higher; default: --eps-clip)", ge=0)
    eps_clip_c: float | None = _f(None, "dual-clip bound for negative advantages", gt=1)
    value_clip: float = _f(0.2, "value clip (ppo)", ge=0)
    use_kl_loss: bool = _f(False, "add a KL(policy || reference) loss (loads the reference)")
    kl_loss_coef: float = _f(0.0, "coefficient of the KL loss", ge=0)
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = _f("k1", "KL estimator")
    use_unbiased_kl: bool = _f(False, "importance-weight the KL estimate")
    kl_coef: float = _f(0.0, "KL penalty folded into the reward", ge=0)
    entropy_coef: float = _f(0.0, "entropy bonus coefficient", ge=0)
    use_rollout_logprobs: bool = _f(False, "engine log-probs are the old policy (no recompute)")
    use_tis: bool = _f(
        False, "truncated importance sampling, pi_old / pi_rollout per token (MIS includes it)"
    )
    tis_clip: float = _f(2.0, "TIS upper truncation", gt=0)
    tis_clip_low: float = _f(0.0, "TIS lower truncation", ge=0)
    use_mis: bool = _f(False, "masked importance sampling: drop out-of-bounds tokens/sequences")
    mis_token_lower_bound: float | None = _f(None, "MIS token mask: lower ratio bound", gt=0)
    mis_token_upper_bound: float | None = _f(None, "MIS token mask: upper ratio bound", gt=0)
    mis_seq_level: Literal["none", "geometric"] = _f(
        "geometric", "MIS sequence mask on the geometric mean of the token ratios (length-independent)"
    )
    mis_seq_lower_bound: float = _f(0.99, "MIS sequence mask: lower bound", gt=0)
    mis_seq_upper_bound: float = _f(1.001, "MIS sequence mask: upper bound", gt=0)
    mis_veto_threshold: float | None = _f(None, "drop a sequence with a token ratio below this", gt=0, lt=1)

    @property
    def correction(self) -> Literal["none", "tis", "mis"]:
        """The off-policy correction (a ``CORRECTIONS`` name): ``mis`` with ``--use-mis`` (which
        truncates the kept tokens' weights as TIS does), else ``tis`` with ``--use-tis``."""
        return "mis" if self.use_mis else "tis" if self.use_tis else "none"

    @property
    def uses_critic(self) -> bool:
        """Whether the run trains a critic (PPO: ``--advantage-estimator ppo``)."""
        return self.advantage_estimator == "ppo"


@dataclass(frozen=True)
class RolloutConfig(_Section):
    """Prompts, sampling, rewards, filters and evaluation."""

    prompt_data: str | None = _f(None, "prompt dataset: a .jsonl or .parquet file")
    input_key: str = _f("input", "dataset key of the prompt")
    label_key: str | None = _f(None, "dataset key of the label")
    metadata_key: str = _f("metadata", "dataset key of per-sample metadata")
    tool_key: str = _f("tools", "dataset key of the tool specs")
    apply_chat_template: bool = _f(False, "format prompts with the tokenizer's chat template")
    apply_chat_template_kwargs: Mapping[str, Any] = _f({}, "extra chat-template arguments (JSON)")
    rollout_max_prompt_len: int | None = _f(None, "drop prompts longer than this (tokens)", ge=1)
    rollout_max_context_len: int | None = _f(None, "cap on prompt + response tokens", ge=1)
    rollout_shuffle: bool = _f(False, "shuffle the prompts every epoch")
    rollout_seed: int = _f(42, "seed of the prompt order and the samplers")
    num_rollout: int | None = _f(None, "number of rollout (RL) steps", ge=1)
    num_epoch: int | None = _f(None, "passes over --prompt-data", ge=1)
    rollout_batch_size: int | None = _f(None, "prompts per rollout step (required)", ge=1)
    n_samples_per_prompt: int = _f(1, "samples per prompt (group size)", ge=1)
    num_steps_per_rollout: int | None = _f(None, "optimizer steps per rollout (derived)", ge=1)
    rollout_max_response_len: int | None = _f(None, "max new tokens per sample", ge=1)
    rollout_temperature: float = _f(1.0, "sampling temperature", ge=0)
    rollout_top_p: float = _f(1.0, "nucleus sampling probability", gt=0, le=1)
    rollout_top_k: int = _f(-1, "top-k sampling (-1 = off)", ge=-1)
    rollout_stop: tuple[str, ...] = _f((), "stop strings")
    rollout_stop_token_ids: tuple[int, ...] = _f((), "stop token ids")
    rollout_skip_special_tokens: bool = _f(False, "drop special tokens from response text")
    over_sampling_batch_size: int | None = _f(None, "prompts per draw while filters fill a batch", ge=1)
    dynamic_sampling_filter_path: str | None = _f(None, "dotted path of a group filter")
    rollout_sample_filter_path: str | None = _f(None, "dotted path of a per-sample filter")
    custom_generate_function_path: str | None = _f(None, "dotted path of a generate function")
    custom_rm_path: str | None = _f(None, "dotted path of a reward function")
    group_rm: bool = _f(False, "the reward function scores a whole group")
    rm_type: str | None = _f(None, "built-in reward: math, countdown, exact, remote_rm, ...")
    rm_url: str | None = _f(None, "URL of the remote reward model")
    reward_key: str | None = _f(None, "key of the reward in a dict-valued reward")
    rm_timeout: float = _f(60.0, "seconds one remote reward-model request may take", gt=0)
    rm_max_retries: int = _f(3, "retries of a failed remote reward-model request", ge=0)
    reward_timeout: float = _f(
        600.0, "seconds one reward call (built-in or custom, retries included) may take", gt=0
    )
    max_failed_rollouts: int = _f(
        3, "stop after this many consecutive rollout steps in which every sample failed", ge=1
    )
    async_mode: Literal["off", "one-step-off", "fully-async"] = _f(
        "off",
        "off: rollout, then training; one-step-off: step k+1's rollout runs while step k trains; "
        "fully-async: a rollout worker keeps generating (docs/async.md)",
    )
    max_weight_staleness: int = _f(
        1, "fully-async: trained tokens are at most N weight versions behind the trained policy", ge=0
    )
    stale_group_action: Literal["regenerate", "drop"] = _f(
        "regenerate", "fully-async: a group past --max-weight-staleness is generated again, or dropped"
    )
    partial_rollout: bool = _f(
        False, "fully-async: requests in flight at a weight update continue under the new weights"
    )
    pause_generation_mode: Literal["in_place", "retract"] = _f(
        "in_place", "partial rollout: keep the KV of paused requests, or drop it and prefill again"
    )
    mask_offpolicy_in_partial_rollout: bool = _f(
        False, "partial rollout: train only on the tokens of a sample's newest weight version"
    )
    skip_bad_samples: bool = _f(False, "skip unusable dataset rows with a warning")
    eval_prompt_data: tuple[str, ...] = _f((), "evaluation sets as NAME PATH pairs")
    eval_interval: int | None = _f(None, "evaluate every N rollout steps", ge=1)
    skip_eval_before_train: bool = _f(False, "no evaluation before the first step")
    eval_input_key: str | None = _f(None, "prompt key of eval sets (default: --input-key)")
    eval_label_key: str | None = _f(None, "label key of eval sets (default: --label-key)")
    n_samples_per_eval_prompt: int = _f(1, "samples per eval prompt", ge=1)
    eval_temperature: float | None = _f(None, "default: --rollout-temperature", ge=0)
    eval_top_p: float | None = _f(None, "default: --rollout-top-p", gt=0, le=1)
    eval_top_k: int | None = _f(None, "default: --rollout-top-k", ge=-1)
    eval_max_response_len: int | None = _f(None, "default: --rollout-max-response-len", ge=1)

    @property
    def update_pause_mode(self) -> Literal["abort", "in_place", "retract"]:
        """How engines pause around a weight update: a partial rollout's requests stay in flight
        (``--pause-generation-mode``); otherwise none is in flight and ``abort`` is SGLang's default."""
        return self.pause_generation_mode if self.partial_rollout else "abort"

    @property
    def eval_datasets(self) -> list[tuple[str, str]]:
        """``--eval-prompt-data`` as (name, path) pairs."""
        return list(zip(self.eval_prompt_data[0::2], self.eval_prompt_data[1::2]))


@dataclass(frozen=True)
class EngineConfig(_Section):
    """The rollout engine: ``--sglang-<name>`` flags with SGLang's names and meanings.

    The only declaration of the engine's settings. The built-in engine is built from it
    (``Engine(model, tokenizer, config)``); ``miles serve`` generates its ``--sglang-*`` flags
    from it and reports it back at ``/get_server_info``; the Ray placement starts its
    ``miles serve`` processes with it written out as those flags. A ``None`` default is derived,
    as its help says: ``max_total_tokens`` and ``mem_fraction_static`` from the memory,
    ``context_length`` from the model, ``random_seed`` from ``--seed`` (unseeded in
    ``miles serve``), ``tp_size`` from ``--rollout-num-gpus-per-engine``. Options the built-in
    engine does not implement are refused when set (:meth:`unimplemented`).

    Fields with ``client`` in their metadata (:meth:`client_fields`) are slime's settings of the
    rollout's client of the engines, not of an engine; ``miles serve`` refuses them.
    ``sglang_passthrough`` holds real SGLang options the built-in engine does not implement,
    keyed by SGLang's CLI name (``"attention-backend"``), values as strings (``"true"`` for
    switches); it is non-empty only with ``--rollout-backend sglang``.

    Every instance is checked against the fields' bounds and choices (``ConfigError`` naming the
    flag), however it was built: flags, a YAML file, ``miles.LLM(**settings)`` or code.
    """

    FLAG_PREFIX: ClassVar[str] = "sglang_"

    mem_fraction_static: float | None = _f(
        None,
        "memory fraction for the KV cache (default: in training 0.4 of the memory free at start, shared "
        "with the trainer; in miles serve 0.85 of the GPU less the weights, or 1 GiB on the CPU)",
        gt=0,
        le=1,
    )
    page_size: int = _f(16, "tokens per KV-cache page", ge=1)
    max_running_requests: int = _f(256, "max requests decoded together", ge=1)
    max_total_tokens: int | None = _f(
        None, "KV-cache capacity in tokens (default: from --sglang-mem-fraction-static of the memory)", ge=1
    )
    max_prefill_tokens: int = _f(4096, "max tokens in one prefill batch", ge=1)
    max_queued_requests: int = _f(
        4096, "requests that may wait beyond the running ones; more are refused (HTTP 503, Retry-After)", ge=0
    )
    chunked_prefill_size: int | None = _f(None, "prefill chunk in tokens (-1 = off)", ge=-1)
    cuda_graph_max_bs: int = _f(
        256, "largest decode batch in a CUDA graph (at most --sglang-max-running-requests)", ge=1
    )
    disable_cuda_graph: bool = _f(False, "run decode eagerly")
    disable_overlap_schedule: bool = _f(
        False, "read each decode step's tokens before queuing the next (the default overlaps on CUDA)"
    )
    context_length: int | None = _f(None, "max context length (default: the model's)", ge=1)
    disable_radix_cache: bool = _f(False, "no prefix reuse in the KV cache")
    random_seed: int | None = _f(None, "seed of unseeded requests (default: --seed; unseeded in miles serve)")
    enable_deterministic_inference: bool = _f(
        False, "batch-invariant kernels: a request's tokens and log-probs do not depend on its batch"
    )
    speculative_algorithm: Literal["EAGLE", "EAGLE3", "NEXTN", "STANDALONE"] | None = _f(None, "draft method")
    speculative_draft_model_path: str | None = _f(None, "draft model (EAGLE head or small model)")
    speculative_num_steps: int | None = _f(None, "draft steps per verification", ge=1)
    speculative_eagle_topk: int | None = _f(None, "draft branching factor", ge=1)
    speculative_num_draft_tokens: int | None = _f(None, "draft tokens verified at once", ge=1)
    tp_size: int | None = _f(None, "tensor-parallel size (= --rollout-num-gpus-per-engine)", ge=1)
    dp_size: int = _f(1, "data-parallel size inside an engine", ge=1)
    ep_size: int = _f(1, "expert-parallel size inside an engine", ge=1)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = _f("info", "engine log level")
    # Not SGLang server options: slime's settings of the rollout's client of the engines.
    server_concurrency: int = _f(512, "max in-flight rollout requests per engine", ge=1, client=True)
    router_ip: str | None = _f(None, "address of an existing sglang-router", client=True)
    router_port: int | None = _f(None, "port of an existing sglang-router", ge=1, client=True)
    router_request_timeout_secs: float = _f(
        14400.0, "seconds the rollout waits for an answer of the engines (or the router)", gt=0, client=True
    )
    sglang_passthrough: Mapping[str, str] = _f({}, "SGLang options passed verbatim", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for spec in SPECS.values():
            if spec.section != "engine":
                continue
            value = getattr(self, spec.name)
            message = check_bounds(spec, value)
            if message is None and spec.choices and value is not None and value not in spec.choices:
                message = f"{spec.flag} must be one of {', '.join(map(str, spec.choices))}, got {value!r}"
            if message is not None:
                raise ConfigError(message)

    @classmethod
    def client_fields(cls) -> frozenset[str]:
        """The fields that set the rollout's client of the engines, not an engine."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("client"))

    def unimplemented(self) -> list[str]:
        """The options set here that the built-in engine does not implement, as flags with the
        reason (empty: the built-in engine runs this config)."""
        why = {"chunked_prefill_size": "prefill is chunked by --sglang-max-prefill-tokens"}
        why.update(
            (f.name, "speculative decoding")
            for f in dataclasses.fields(self)
            if f.name.startswith("speculative_")
        )
        out = [
            f"--sglang-{n.replace('_', '-')} ({reason})"
            for n, reason in why.items()
            if getattr(self, n) is not None
        ]
        for name in ("tp_size", "dp_size", "ep_size"):
            if getattr(self, name) not in (None, 1):
                flag = f"--sglang-{name.replace('_', '-')}"
                out.append(f"{flag} {getattr(self, name)} (an engine runs on one device: start more engines)")
        out += [
            f"--sglang-{name} (an SGLang option; --rollout-backend sglang passes it to an external server)"
            for name in self.sglang_passthrough
        ]
        return out

    def sglang_server_args(self) -> list[str]:
        """Arguments for an external SGLang server: the SGLang options set here away from
        their defaults, then the passthrough ones."""
        args: list[str] = []
        for f in dataclasses.fields(self):
            name, value = f.name.replace("_", "-"), getattr(self, f.name)
            if name in sgl.SGLANG_OPTIONS and value != f.default:
                args += [f"--{name}"] if value is True else [f"--{name}", str(value)]
        for name, value in self.sglang_passthrough.items():
            args += [f"--{name}", value] if sgl.SGLANG_OPTIONS[name].takes_value else [f"--{name}"]
        return args


@dataclass(frozen=True)
class PlacementConfig(_Section):
    """Where the trainer and the engines run, and how weights travel between them."""

    placement_backend: Literal["auto", "local", "ray"] = _f(
        "auto",
        "local: one process; ray: trainer ranks and engines as Ray actors "
        "(auto: ray with several trainer ranks, --rollout-num-gpus or external engines)",
    )
    colocate: bool = _f(False, "trainer and engines share the GPUs, taking turns")
    offload: bool = _f(False, "both --offload-train and --offload-rollout")
    offload_train: bool | None = _f(None, "trainer state to CPU during rollout (default: --colocate)")
    offload_rollout: bool | None = _f(None, "free engine memory during training (default: --colocate)")
    actor_num_nodes: int = _f(1, "nodes of the trainer", ge=1)
    actor_num_gpus_per_node: int = _f(1, "GPUs per node of the trainer", ge=1, slime="8")
    rollout_num_gpus: int | None = _f(None, "GPUs of all engines (colocated: the trainer's)", ge=1)
    rollout_num_gpus_per_engine: int = _f(1, "GPUs of one engine", ge=1)
    rollout_backend: Literal["miles", "sglang"] = _f("miles", "built-in engine or external SGLang")
    rollout_external_engine_addrs: tuple[str, ...] = _f((), "host:port of engines already running")
    update_weight_buffer_size: int = _f(512 * 1024**2, "bytes per weight-update bucket", ge=1)
    update_weight_transport: Literal["auto", "tensor", "distributed", "disk"] = _f(
        "auto", "weight sync: in-memory/IPC tensors, a broadcast group, or files"
    )
    update_weights_interval: int = _f(1, "push weights every N steps (and after the last)", ge=1)
    use_fault_tolerance: bool = _f(False, "restart dead engines and retry their requests")
    rollout_health_check_interval: float = _f(30.0, "seconds between engine health checks", gt=0)
    rollout_health_check_timeout: float = _f(30.0, "seconds before a health check fails", gt=0)
    rollout_health_check_first_wait: float = _f(0.0, "seconds before the first check", ge=0)

    @property
    def use_ray(self) -> bool:
        """Whether the run is placed on Ray (``placement_backend`` as resolved by the rules)."""
        return self.placement_backend == "ray"

    @property
    def actor_world_size(self) -> int:
        """Trainer ranks, which is also the data-parallel size of FSDP."""
        return self.actor_num_nodes * self.actor_num_gpus_per_node


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Saving and resuming."""

    save: str | None = _f(None, "directory for checkpoints")
    load: str | None = _f(None, "checkpoint directory to resume from")
    save_interval: int | None = _f(None, "save every N rollout steps", ge=1)
    save_hf: str | None = _f(None, "also export Hugging Face safetensors here")
    allow_fresh_start: bool = _f(
        False, "with --load: start from --hf-checkpoint when it holds no checkpoint yet (auto-resume)"
    )
    no_save_optim: bool = _f(False, "do not save the optimizer state")


@dataclass(frozen=True)
class LogConfig(_Section):
    """Metrics sinks, logs and debugging dumps."""

    run_dir: str | None = _f(None, "directory of logs and metrics (default: runs/<date-time>)")
    overwrite: bool = _f(False, "reuse a --run-dir that already holds a run, replacing its files")
    log_level: Literal["debug", "info", "warning", "error"] = _f("info", "Miles log level")
    log_interval: int = _f(1, "log metrics every N steps", ge=1)
    use_tensorboard: bool = _f(False, "write TensorBoard events")
    use_wandb: bool = _f(False, "log to Weights & Biases")
    wandb_project: str | None = _f(None, "W&B project")
    wandb_group: str | None = _f(None, "W&B group")
    wandb_mode: Literal["online", "offline", "disabled"] | None = _f(None, "W&B mode")
    save_debug_rollout_data: str | None = _f(None, "dump rollouts here ({rollout_id} is filled in)")
    load_debug_rollout_data: str | None = _f(None, "replay dumped rollouts instead of generating")
    debug_rollout_only: bool = _f(False, "generate rollouts, skip training")
    debug_train_only: bool = _f(False, "train on --load-debug-rollout-data, no engine")


@dataclass(frozen=True)
class MilesConfig:
    """The whole run. Build it with :func:`parse_train_args`; hand each component its section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    true_on_policy_mode: bool = _f(False, "engine and trainer log-probs equal bit for bit")
    deterministic_mode: bool = _f(False, "batch-invariant kernels in trainer and engine")
    use_rollout_routing_replay: bool = _f(False, "R3: the trainer replays the engine's experts")


SPECS: dict[str, FieldSpec] = collect_specs(MilesConfig)
"""Flat key -> spec of every setting; the flags and YAML keys are generated from it."""

_SECTION_TYPES: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(MilesConfig)
    if f.default_factory is not dataclasses.MISSING
}
_GROUP_TITLES = {
    "model": "model: policy, reference and critic weights",
    "train": "train: the FSDP2 trainer (usual training-backend names)",
    "algo": "algo: advantages, losses, KL, TIS/MIS",
    "rollout": "rollout: prompts, sampling, rewards, filters, evaluation (slime names)",
    "engine": "engine: --sglang-* options the built-in engine implements (SGLang names)",
    "placement": "placement: GPUs, colocation, weight sync",
    "checkpoint": "checkpoint",
    "log": "log: metrics, logs, debugging",
    "": "modes",
}
_PASS_DEST = "sglang_passthrough:"  # argparse dest prefix of SGLang options kept verbatim


def add_sglang_passthrough_arguments(parser: argparse.ArgumentParser) -> None:
    """Make the SGLang options the built-in engine lacks known to ``parser``, hidden from
    ``--help``, so that validation says what they are instead of "unrecognized argument". Each
    lands in the namespace under :func:`passthrough_options`'s prefix, only when given."""
    for opt in sgl.SGLANG_OPTIONS.values():
        if opt.status != "builtin":
            how: dict[str, Any] = (
                {"metavar": "V"} if opt.takes_value else {"action": "store_const", "const": "true"}
            )
            parser.add_argument(
                opt.flag, dest=_PASS_DEST + opt.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **how
            )


def passthrough_options(namespace: argparse.Namespace) -> dict[str, str]:
    """The SGLang options :func:`add_sglang_passthrough_arguments` parsed, by SGLang name."""
    return {dest[len(_PASS_DEST) :]: v for dest, v in vars(namespace).items() if dest.startswith(_PASS_DEST)}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and every config flag, grouped by section, to ``parser``."""
    parser.add_argument(
        "--config", metavar="FILE.yaml", default=argparse.SUPPRESS, help="YAML file of settings"
    )
    groups = {s: parser.add_argument_group(title) for s, title in _GROUP_TITLES.items()}
    for spec in SPECS.values():
        if spec.cli:
            add_flag(groups[spec.section], spec)
    add_sglang_passthrough_arguments(parser)
    parser.epilog = (
        "Other SGLang server options (--sglang-attention-backend, --sglang-quantization, ...) go to an "
        "external SGLang server with --rollout-backend sglang. See docs/configuration.md."
    )


def parse_train_args(argv: Sequence[str], *, refuse_unbuilt: bool = True) -> MilesConfig:
    """Parse ``miles train`` arguments (and the ``--config`` file they name) into a validated
    :class:`MilesConfig`. Raises :class:`ConfigError` with a message that names the fix.
    ``refuse_unbuilt``: see :func:`build_config`."""
    parser = Parser(prog="miles train", allow_abbrev=False)
    add_train_arguments(parser)
    namespace, extras = parser.parse_known_args(list(argv))
    if extras:
        raise unknown_argument_error(extras, parser)
    return config_from_namespace(namespace, refuse_unbuilt=refuse_unbuilt)


def config_from_namespace(namespace: argparse.Namespace, *, refuse_unbuilt: bool = True) -> MilesConfig:
    """Defaults, then the ``--config`` file, then the flags present in ``namespace``.

    The namespace must come from a parser built by :func:`add_train_arguments`, whose options
    default to SUPPRESS: a flag is in the namespace only when it was given.
    ``refuse_unbuilt``: see :func:`build_config`.
    """
    values: dict[str, Any] = {k: s.default for k, s in SPECS.items()}
    explicit: set[str] = set()
    passthrough: dict[str, str] = {}
    path = getattr(namespace, "config", None)
    if path is not None:
        prefixes = {name: getattr(t, "FLAG_PREFIX", "") for name, t in _SECTION_TYPES.items()}
        for key, value in read_yaml_items(path, prefixes):
            _set_from_yaml(key, value, path, values, explicit, passthrough)
    for dest, value in vars(namespace).items():
        if dest in SPECS:
            values[dest] = value
            explicit.add(dest)
    passthrough.update(passthrough_options(namespace))
    return build_config(values, explicit, passthrough, refuse_unbuilt=refuse_unbuilt)


def config_to_yaml(config: MilesConfig) -> str:
    """The resolved config as YAML, nested by section; ``--config`` reads it back unchanged."""
    import yaml

    return yaml.safe_dump(to_plain(config), sort_keys=False, default_flow_style=False)


def _set_from_yaml(
    key: str, value: Any, path: str, values: dict[str, Any], explicit: set[str], passthrough: dict[str, str]
) -> None:
    name = key.replace("-", "_")
    spec = SPECS.get(name)
    if spec is not None and spec.cli:
        values[name] = coerce(spec, value, path)
        explicit.add(name)
    elif name == "sglang_passthrough" and isinstance(value, dict):
        for sub_key, sub_value in value.items():
            _set_from_yaml(f"sglang_{sub_key}", sub_value, path, values, explicit, passthrough)
    elif (option := sgl.find_option(name)) is not None and option.status != "builtin":
        text = sgl.passthrough_text(option, value, path)
        if text is None:
            passthrough.pop(option.name, None)
        else:
            passthrough[option.name] = text
    else:
        known = [k for k, s in SPECS.items() if s.cli] + [
            "sglang_" + n.replace("-", "_") for n in sgl.SGLANG_OPTIONS
        ]
        hint = did_you_mean(name, known)
        raise ConfigError(f"{path}: unknown key '{key}'{hint.replace('_', '-') if '-' in key else hint}")


# --------------------------------------------------------------------------- resolution


def build_config(
    values: dict[str, Any], explicit: set[str], passthrough: dict[str, str], *, refuse_unbuilt: bool = True
) -> MilesConfig:
    """Check the merged flat settings, freeze them into a MilesConfig, and resolve it.

    ``explicit`` holds the keys the user set (file or flags); ``passthrough`` the verbatim SGLang
    options by name. Each value is checked against its field's bounds here; the cross-field rules
    and derived defaults (``miles.config_rules``) then run on the typed sections. Settings Miles
    parses but does not build are refused last, unless ``refuse_unbuilt`` is False: for tools and
    tests that read or write such a config. A run refuses them anyway (``miles.orchestrate.preflight.preflight``).
    """
    for key, spec in SPECS.items():
        if (message := check_bounds(spec, values[key])) is not None:
            raise ConfigError(message)
    flat = {**values, "sglang_passthrough": dict(passthrough)}
    sections = {
        name: cls(**{s.name: flat[k] for k, s in SPECS.items() if s.section == name})
        for name, cls in _SECTION_TYPES.items()
    }
    config = MilesConfig(**sections, **{s.name: flat[k] for k, s in SPECS.items() if s.section == ""})
    config = rules.resolve(config, explicit)
    if refuse_unbuilt:
        rules.refuse_unbuilt(config)
    return config

"""The cross-field rules of the Miles configuration: required settings, derived defaults,
batch-size arithmetic, and flags that conflict or depend on each other.

The rules work on the flat settings (every key is unique over the whole config tree, see
``miles.config.SPECS``) before they are frozen into dataclasses, because derived defaults are
written back. ``miles.config.build_config`` is the only caller. Every message names the flags
involved and says how to fix them; each one has a unit test in ``tests/test_config.py``.
"""

from __future__ import annotations

from typing import Any

from miles.utils.dataclass_flags import ConfigError
from miles.utils.sglang_options import passthrough_problem

# Estimators whose advantage compares the samples of one prompt: they need groups of 2+.
GROUP_ESTIMATORS = ("grpo", "gspo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline")


class Values(dict[str, Any]):
    """The flat settings with attribute access, while derived settings are filled in."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def check_required(v: Values) -> None:
    """The settings a training run cannot do without."""
    if v.hf_checkpoint is None:
        raise ConfigError(
            "--hf-checkpoint is required: the policy model (a Hugging Face directory or a .gguf file)"
        )
    if v.rollout_batch_size is None:
        raise ConfigError("--rollout-batch-size is required: the number of prompts per rollout step")
    if v.prompt_data is None and v.load_debug_rollout_data is None:
        raise ConfigError(
            "--prompt-data is required (a .jsonl or .parquet file of prompts), "
            "unless --load-debug-rollout-data replays saved rollouts"
        )
    if v.num_rollout is None and v.num_epoch is None:
        raise ConfigError(
            "give --num-rollout N (the number of RL steps) or --num-epoch N (passes over --prompt-data)"
        )


def derive(v: Values, explicit: set[str]) -> None:
    """Fill in the settings whose default depends on others, checking that they fit together."""
    rbs, n = v.rollout_batch_size, v.n_samples_per_prompt
    if v.over_sampling_batch_size is None:
        v["over_sampling_batch_size"] = rbs
    elif v.over_sampling_batch_size < rbs:
        raise ConfigError(
            f"--over-sampling-batch-size ({v.over_sampling_batch_size}) must be >= --rollout-batch-size ({rbs}): "
            "it is the number of prompts drawn at a time while the filters fill a rollout batch"
        )
    samples = rbs * n
    per = f"--rollout-batch-size × --n-samples-per-prompt = {rbs} × {n} = {samples} samples per rollout"
    gbs, steps = v.global_batch_size, v.num_steps_per_rollout
    if gbs is None:
        steps = steps or 1
        if samples % steps:
            raise ConfigError(
                f"{per} cannot be split into --num-steps-per-rollout {steps} equal optimizer steps"
            )
        gbs = samples // steps
    else:
        if samples % gbs:
            raise ConfigError(
                f"{per} must be a multiple of --global-batch-size {gbs} (whole optimizer steps)"
            )
        if steps is not None and steps != samples // gbs:
            raise ConfigError(
                f"--num-steps-per-rollout {steps} disagrees with --global-batch-size {gbs}: {samples} samples "
                f"per rollout / {gbs} = {samples // gbs} steps; give only one of the two"
            )
        steps = samples // gbs
    v["global_batch_size"], v["num_steps_per_rollout"] = gbs, steps
    if v.lr_decay_style != "constant" and v.lr_decay_iters is None:
        if v.num_rollout is None:
            raise ConfigError(
                f"--lr-decay-style {v.lr_decay_style} needs --lr-decay-iters, or --num-rollout to decay over the whole run"
            )
        v["lr_decay_iters"] = v.num_rollout * steps  # "all": every optimizer step of the run

    dp = v.actor_num_nodes * v.actor_num_gpus_per_node
    dp_is = f"--actor-num-nodes {v.actor_num_nodes} × --actor-num-gpus-per-node {v.actor_num_gpus_per_node}"
    if v.use_dynamic_batch_size and gbs % dp:
        raise ConfigError(
            f"--global-batch-size {gbs} must be divisible by the data-parallel size {dp} ({dp_is})"
        )
    if not v.use_dynamic_batch_size and gbs % (v.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {gbs} must be divisible by --micro-batch-size × data-parallel size = "
            f"{v.micro_batch_size} × {dp} = {v.micro_batch_size * dp} (data-parallel size = {dp_is})"
        )

    if v.eps_clip_high is None:
        v["eps_clip_high"] = v.eps_clip
    for key in ("offload_train", "offload_rollout"):
        if v[key] is None:
            v[key] = v.colocate or v.offload
    if v.colocate and v.rollout_num_gpus is None:
        v["rollout_num_gpus"] = dp
    elif v.colocate and v.rollout_num_gpus != dp:
        raise ConfigError(
            f"--colocate runs the engines on the trainer's GPUs, so --rollout-num-gpus ({v.rollout_num_gpus}) "
            f"must equal --actor-num-nodes × --actor-num-gpus-per-node ({dp})"
        )
    if v.placement_backend == "auto":
        separate_engines = v.rollout_num_gpus is not None and not v.colocate
        ray = dp > 1 or v.actor_num_nodes > 1 or separate_engines or bool(v.rollout_external_engine_addrs)
        v["placement_backend"] = "ray" if ray else "local"
    elif v.placement_backend == "local" and (dp > 1 or v.rollout_external_engine_addrs):
        raise ConfigError(
            "--placement-backend local runs one trainer rank and its own engine in one process: "
            f"drop it for {dp_is} > 1 or --rollout-external-engine-addrs (they need --placement-backend ray)"
        )
    per_engine = v.rollout_num_gpus_per_engine
    if v.rollout_num_gpus is not None and v.rollout_num_gpus % per_engine:
        raise ConfigError(
            f"--rollout-num-gpus ({v.rollout_num_gpus}) must be a multiple of "
            f"--rollout-num-gpus-per-engine ({per_engine})"
        )
    if v.sglang_tp_size is None:
        v["sglang_tp_size"] = per_engine
    elif v.sglang_tp_size != per_engine:
        raise ConfigError(
            f"--sglang-tp-size {v.sglang_tp_size} disagrees with --rollout-num-gpus-per-engine {per_engine}: "
            "an engine's tensor-parallel group spans its GPUs; set --rollout-num-gpus-per-engine only"
        )
    if v.sglang_random_seed is None:
        v["sglang_random_seed"] = v.seed
    if v.true_on_policy_mode:
        if "deterministic_mode" in explicit and not v.deterministic_mode:
            raise ConfigError(
                "--true-on-policy-mode needs deterministic kernels: drop --no-deterministic-mode"
            )
        v["deterministic_mode"] = True
    if v.deterministic_mode:
        if (
            "sglang_enable_deterministic_inference" in explicit
            and not v.sglang_enable_deterministic_inference
        ):
            raise ConfigError(
                "--deterministic-mode needs a deterministic engine: drop --no-sglang-enable-deterministic-inference"
            )
        v["sglang_enable_deterministic_inference"] = True


def check(v: Values) -> None:
    """Cross-field checks on the resolved config; the first problem found is raised."""
    external = bool(v.rollout_external_engine_addrs)
    problem = passthrough_problem(v.sglang_passthrough, v.rollout_backend, external)
    if problem is not None:
        raise ConfigError(problem)
    pairs, names = v.eval_prompt_data, v.eval_prompt_data[0::2]
    file_like = [x for x in names if x.endswith((".jsonl", ".parquet", ".json"))]
    speculative = (
        v.sglang_speculative_num_steps,
        v.sglang_speculative_eagle_topk,
        v.sglang_speculative_num_draft_tokens,
    )
    tp = v.sglang_tp_size or 1
    problems: list[tuple[bool, str]] = [
        (
            v.colocate and external,
            "--colocate cannot share GPUs with engines at --rollout-external-engine-addrs",
        ),
        (v.rollout_top_k == 0, "--rollout-top-k must be -1 (off) or >= 1, got 0"),
        (v.eval_top_k == 0, "--eval-top-k must be -1 (off) or >= 1, got 0"),
        (
            len(pairs) % 2 == 1,
            "--eval-prompt-data takes NAME PATH pairs (e.g. --eval-prompt-data aime aime.jsonl gsm gsm.jsonl), "
            f"got {len(pairs)} values: {' '.join(pairs)}",
        ),
        (
            bool(file_like),
            f"--eval-prompt-data takes NAME PATH pairs, name first; {file_like[:1]} looks like a file",
        ),
        (len(set(names)) != len(names), f"--eval-prompt-data names must be unique, got {' '.join(names)}"),
        (v.eval_interval is not None and not pairs, "--eval-interval needs --eval-prompt-data NAME PATH ..."),
        (v.min_lr > v.lr, f"--min-lr ({v.min_lr}) must not exceed --lr ({v.lr})"),
        (
            v.tis_clip_low >= v.tis_clip,
            f"--tis-clip-low ({v.tis_clip_low}) must be < --tis-clip ({v.tis_clip})",
        ),
        (
            (v.mis_token_lower_bound is None) != (v.mis_token_upper_bound is None),
            "--mis-token-lower-bound and --mis-token-upper-bound go together: give both or neither",
        ),
        (
            v.mis_token_lower_bound is not None and v.mis_token_lower_bound >= (v.mis_token_upper_bound or 0),
            f"--mis-token-lower-bound ({v.mis_token_lower_bound}) must be < "
            f"--mis-token-upper-bound ({v.mis_token_upper_bound})",
        ),
        (
            v.mis_seq_lower_bound >= v.mis_seq_upper_bound,
            f"--mis-seq-lower-bound ({v.mis_seq_lower_bound}) must be < --mis-seq-upper-bound ({v.mis_seq_upper_bound})",
        ),
        (
            v.tis_clip < 1,
            f"--tis-clip ({v.tis_clip}) must be >= 1: a ratio of 1 (no mismatch) must keep weight 1",
        ),
        (
            v.tis_clip_low > 1,
            f"--tis-clip-low ({v.tis_clip_low}) must be <= 1: a ratio of 1 must keep weight 1",
        ),
        (
            v.mis_token_lower_bound is not None
            and (v.mis_token_lower_bound > 1 or (v.mis_token_upper_bound or 1) < 1),
            f"--mis-token-lower-bound ({v.mis_token_lower_bound}) must be <= 1 <= --mis-token-upper-bound "
            f"({v.mis_token_upper_bound}): tokens without mismatch must be kept",
        ),
        (
            v.mis_seq_lower_bound > 1 or v.mis_seq_upper_bound < 1,
            f"--mis-seq-lower-bound ({v.mis_seq_lower_bound}) must be <= 1 <= --mis-seq-upper-bound "
            f"({v.mis_seq_upper_bound}): sequences without mismatch must be kept",
        ),
        (
            v.true_on_policy_mode and (v.rollout_top_p < 1 or v.rollout_top_k != -1),
            "--true-on-policy-mode needs the full tempered distribution at sampling time (the trainer scores it): "
            "drop --rollout-top-p/--rollout-top-k",
        ),
        (
            not v.use_mis and (v.mis_token_lower_bound is not None or v.mis_veto_threshold is not None),
            "--mis-token-lower-bound/--mis-token-upper-bound/--mis-veto-threshold have no effect without --use-mis",
        ),
        (
            v.use_mis
            and v.mis_seq_level == "none"
            and v.mis_token_lower_bound is None
            and v.mis_veto_threshold is None,
            "--use-mis with --mis-seq-level none masks nothing: give --mis-token-lower-bound and "
            "--mis-token-upper-bound, or --mis-veto-threshold",
        ),
        (
            (v.use_tis or v.use_mis) and v.use_rollout_logprobs,
            f"--{'use-tis' if v.use_tis else 'use-mis'} needs the rollout log-probs as a policy apart from the "
            "trainer's old one; with --use-rollout-logprobs they are the same and every weight is 1. Drop one",
        ),
        (
            v.kl_coef > 0 and v.kl_loss_coef > 0,
            "--kl-coef (KL as a reward penalty) and --kl-loss-coef (KL as a loss term) cannot both be non-zero",
        ),
        (
            v.kl_loss_coef > 0 and not v.use_kl_loss,
            f"--kl-loss-coef {v.kl_loss_coef} has no effect without --use-kl-loss",
        ),
        (
            v.advantage_estimator in GROUP_ESTIMATORS
            and v.n_samples_per_prompt < 2
            and v.loss_type == "policy_loss",
            f"--advantage-estimator {v.advantage_estimator} compares the samples of a prompt: with "
            "--n-samples-per-prompt 1 every advantage is 0; use 2 or more",
        ),
        (
            v.advantage_estimator == "ppo" and v.critic_load is None,
            "--advantage-estimator ppo trains a critic: give --critic-load PATH (e.g. the --hf-checkpoint path)",
        ),
        (
            v.advantage_estimator != "ppo"
            and (v.critic_load is not None or v.critic_lr is not None or v.num_critic_only_steps > 0),
            "--critic-load/--critic-lr/--num-critic-only-steps are only used with --advantage-estimator ppo",
        ),
        (
            v.use_dynamic_batch_size and v.max_tokens_per_gpu is None,
            "--use-dynamic-batch-size needs --max-tokens-per-gpu (the token budget of one micro-batch)",
        ),
        (
            (v.actor_num_nodes * v.actor_num_gpus_per_node) % v.expert_model_parallel_size != 0,
            f"--expert-model-parallel-size {v.expert_model_parallel_size} must divide the trainer's "
            f"{(v.actor_num_nodes * v.actor_num_gpus_per_node)} ranks (--actor-num-nodes × --actor-num-gpus-per-node)",
        ),
        (
            v.debug_rollout_only and v.debug_train_only,
            "--debug-rollout-only and --debug-train-only exclude each other: one skips training, the other rollout",
        ),
        (
            v.debug_rollout_only and v.load_debug_rollout_data is not None,
            "--load-debug-rollout-data replays saved rollouts instead of generating, so --debug-rollout-only "
            "would do nothing",
        ),
        (
            v.debug_train_only and v.load_debug_rollout_data is None,
            "--debug-train-only needs --load-debug-rollout-data (the saved rollouts to train on)",
        ),
        (
            v.save_interval is not None and v.save is None,
            "--save-interval needs --save DIR",
        ),
        (
            v.loss_type == "sft_loss" and v.label_key is None and v.load_debug_rollout_data is None,
            "--loss-type sft_loss trains on each prompt's label as the response: give --label-key KEY",
        ),
        (
            v.allow_fresh_start and v.load is None,
            "--allow-fresh-start needs --load DIR (it allows --load to find no checkpoint yet)",
        ),
        (
            v.advantage_estimator == "ppo" and v.loss_type != "policy_loss",
            f"--advantage-estimator ppo needs --loss-type policy_loss (the critic's returns), got {v.loss_type}",
        ),
        (v.rm_type == "remote_rm" and v.rm_url is None, "--rm-type remote_rm needs --rm-url"),
        (
            v.group_rm and v.custom_rm_path is None,
            "--group-rm needs --custom-rm-path (a function scoring a group)",
        ),
        (
            v.mask_offpolicy_in_partial_rollout and not v.partial_rollout,
            "--mask-offpolicy-in-partial-rollout needs --partial-rollout",
        ),
        (
            v.true_on_policy_mode and v.rollout_backend == "sglang",
            "--true-on-policy-mode needs the built-in engine (--rollout-backend miles): "
            "an external SGLang server runs other kernels than the trainer",
        ),
        (
            v.use_rollout_routing_replay and v.use_routing_replay,
            "--use-rollout-routing-replay (R3: the engine's routing) and --use-routing-replay "
            "(R2: the trainer's) exclude each other",
        ),
        (
            v.sglang_speculative_algorithm is None
            and (
                any(x is not None for x in speculative) or v.sglang_speculative_draft_model_path is not None
            ),
            "--sglang-speculative-* settings need --sglang-speculative-algorithm",
        ),
        (
            tp % v.sglang_dp_size != 0 or tp % v.sglang_ep_size != 0,
            f"--sglang-dp-size ({v.sglang_dp_size}) and --sglang-ep-size ({v.sglang_ep_size}) must divide the engine's "
            f"tensor-parallel size {tp} (--rollout-num-gpus-per-engine)",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)

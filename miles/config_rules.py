"""The cross-field rules of the Miles configuration: required settings, derived defaults, batch
arithmetic, flags that conflict or depend on each other, and flags Miles parses but refuses.

The rules read the typed sections of :class:`miles.config.MilesConfig`, so mypy checks every
field they touch. :func:`resolve` checks the required settings, fills in the derived defaults (a
new frozen config, written with ``dataclasses.replace``), then checks the result concept by
concept; :func:`refuse_unbuilt` then refuses the flags the parser accepts under slime's names but
Miles does not build. ``miles.config.build_config`` runs both. The first problem found is raised
as a :class:`ConfigError` naming the flags involved and the fix; each message has a unit test in
``tests/test_config.py``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from miles.types import GREEDY_TEMPERATURE, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from miles.utils.dataclass_flags import ConfigError
from miles.utils.sglang_options import passthrough_problem

if TYPE_CHECKING:  # annotations only: miles.config imports this module
    from miles.config import MilesConfig

# Estimators whose advantage compares the samples of one prompt: they need groups of 2+.
GROUP_ESTIMATORS = ("grpo", "gspo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline")


def resolve(c: MilesConfig, explicit: set[str]) -> MilesConfig:
    """``c`` with its derived settings filled in, once every rule holds.

    ``explicit`` holds the flat keys the user set (flags or file). Derivations run before the
    checks that read what they fill in; the order decides which message a config with several
    problems gets, so it is kept.
    """
    check_required(c)
    c = derive_batch_sizes(c)
    c = derive_algorithm(c)
    c = derive_placement(c)
    c = derive_modes(c, explicit)
    c = derive_async(c)
    check_engine_options(c)
    check_placement(c)
    check_evaluation(c)
    check_algorithm(c)
    check_training(c)
    check_modes(c)
    check_async(c)
    check_runs(c)
    check_rewards(c)
    check_sampling(c)
    return c


def _first(problems: list[tuple[bool, str]]) -> None:
    """Raise the message of the first problem that holds."""
    for bad, message in problems:
        if bad:
            raise ConfigError(message)


def _dp_size(c: MilesConfig) -> int:
    """Trainer ranks (the data-parallel size of FSDP)."""
    return c.placement.actor_num_nodes * c.placement.actor_num_gpus_per_node


# --------------------------------------------------------------------------- required settings


def check_required(c: MilesConfig) -> None:
    """The settings a training run cannot do without."""
    if c.model.hf_checkpoint is None:
        raise ConfigError(
            "--hf-checkpoint is required: the policy model (a Hugging Face directory or a .gguf file)"
        )
    if c.rollout.rollout_batch_size is None:
        raise ConfigError("--rollout-batch-size is required: the number of prompts per rollout step")
    if c.rollout.prompt_data is None and c.log.load_debug_rollout_data is None:
        raise ConfigError(
            "--prompt-data is required (a .jsonl or .parquet file of prompts), "
            "unless --load-debug-rollout-data replays saved rollouts"
        )
    if c.rollout.num_rollout is None and c.rollout.num_epoch is None:
        raise ConfigError(
            "give --num-rollout N (the number of RL steps) or --num-epoch N (passes over --prompt-data)"
        )


# --------------------------------------------------------------------------- derived defaults


def derive_batch_sizes(c: MilesConfig) -> MilesConfig:
    """Prompts per draw, samples per optimizer step, steps per rollout and the lr decay length,
    checked against the data-parallel size."""
    r, t = c.rollout, c.train
    rbs, n = r.rollout_batch_size, r.n_samples_per_prompt
    assert rbs is not None  # check_required
    over = r.over_sampling_batch_size
    if over is None:
        over = rbs
    elif over < rbs:
        raise ConfigError(
            f"--over-sampling-batch-size ({over}) must be >= --rollout-batch-size ({rbs}): "
            "it is the number of prompts drawn at a time while the filters fill a rollout batch"
        )
    samples = rbs * n
    per = f"--rollout-batch-size × --n-samples-per-prompt = {rbs} × {n} = {samples} samples per rollout"
    gbs, steps = t.global_batch_size, r.num_steps_per_rollout
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
    decay_iters = t.lr_decay_iters
    if t.lr_decay_style != "constant" and decay_iters is None:
        if r.num_rollout is None:
            raise ConfigError(
                f"--lr-decay-style {t.lr_decay_style} needs --lr-decay-iters, or --num-rollout to decay over the whole run"
            )
        decay_iters = r.num_rollout * steps  # "all": every optimizer step of the run

    p, dp = c.placement, _dp_size(c)
    dp_is = f"--actor-num-nodes {p.actor_num_nodes} × --actor-num-gpus-per-node {p.actor_num_gpus_per_node}"
    if t.use_dynamic_batch_size and gbs % dp:
        raise ConfigError(
            f"--global-batch-size {gbs} must be divisible by the data-parallel size {dp} ({dp_is})"
        )
    if not t.use_dynamic_batch_size and gbs % (t.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {gbs} must be divisible by --micro-batch-size × data-parallel size = "
            f"{t.micro_batch_size} × {dp} = {t.micro_batch_size * dp} (data-parallel size = {dp_is})"
        )
    return replace(
        c,
        rollout=replace(r, over_sampling_batch_size=over, num_steps_per_rollout=steps),
        train=replace(t, global_batch_size=gbs, lr_decay_iters=decay_iters),
    )


def derive_algorithm(c: MilesConfig) -> MilesConfig:
    """The upper clip defaults to the lower one (symmetric PPO clip)."""
    a = c.algo
    return replace(
        c, algo=replace(a, eps_clip_high=a.eps_clip if a.eps_clip_high is None else a.eps_clip_high)
    )


def derive_placement(c: MilesConfig) -> MilesConfig:
    """Offloading, the engines' GPUs, the placement backend and the engines' tensor-parallel size."""
    p, e, dp = c.placement, c.engine, _dp_size(c)
    offload_train = (p.colocate or p.offload) if p.offload_train is None else p.offload_train
    offload_rollout = (p.colocate or p.offload) if p.offload_rollout is None else p.offload_rollout
    gpus = p.rollout_num_gpus
    if p.colocate and gpus is None:
        gpus = dp
    elif p.colocate and gpus != dp:
        raise ConfigError(
            f"--colocate runs the engines on the trainer's GPUs, so --rollout-num-gpus ({gpus}) "
            f"must equal --actor-num-nodes × --actor-num-gpus-per-node ({dp})"
        )
    backend = p.placement_backend
    dp_is = f"--actor-num-nodes {p.actor_num_nodes} × --actor-num-gpus-per-node {p.actor_num_gpus_per_node}"
    if backend == "auto":
        separate_engines = gpus is not None and not p.colocate
        ray = dp > 1 or p.actor_num_nodes > 1 or separate_engines or bool(p.rollout_external_engine_addrs)
        backend = "ray" if ray else "local"
    elif backend == "local" and (dp > 1 or p.rollout_external_engine_addrs):
        raise ConfigError(
            "--placement-backend local runs one trainer rank and its own engine in one process: "
            f"drop it for {dp_is} > 1 or --rollout-external-engine-addrs (they need --placement-backend ray)"
        )
    per_engine = p.rollout_num_gpus_per_engine
    if gpus is not None and gpus % per_engine:
        raise ConfigError(
            f"--rollout-num-gpus ({gpus}) must be a multiple of --rollout-num-gpus-per-engine ({per_engine})"
        )
    tp = e.tp_size
    if tp is None:
        tp = per_engine
    elif tp != per_engine:
        raise ConfigError(
            f"--sglang-tp-size {tp} disagrees with --rollout-num-gpus-per-engine {per_engine}: "
            "an engine's tensor-parallel group spans its GPUs; set --rollout-num-gpus-per-engine only"
        )
    placement = replace(
        p,
        offload_train=offload_train,
        offload_rollout=offload_rollout,
        rollout_num_gpus=gpus,
        placement_backend=backend,
    )
    return replace(c, placement=placement, engine=replace(e, tp_size=tp))


def derive_modes(c: MilesConfig, explicit: set[str]) -> MilesConfig:
    """The engine's seed, and the kernels true on-policy needs (deterministic in trainer and engine)."""
    e = c.engine
    seed = c.train.seed if e.random_seed is None else e.random_seed
    deterministic = c.deterministic_mode
    if c.true_on_policy_mode:
        if "deterministic_mode" in explicit and not deterministic:
            raise ConfigError(
                "--true-on-policy-mode needs deterministic kernels: drop --no-deterministic-mode"
            )
        deterministic = True
    engine_deterministic = e.enable_deterministic_inference
    if deterministic:
        if "sglang_enable_deterministic_inference" in explicit and not engine_deterministic:
            raise ConfigError(
                "--deterministic-mode needs a deterministic engine: drop --no-sglang-enable-deterministic-inference"
            )
        engine_deterministic = True
    engine = replace(e, random_seed=seed, enable_deterministic_inference=engine_deterministic)
    return replace(c, deterministic_mode=deterministic, engine=engine)


def derive_async(c: MilesConfig) -> MilesConfig:
    """Asynchronous modes train on samples of older weights: the policy loss is decoupled PPO,
    whose importance weights against the engine's policy are TIS unless --use-mis is given
    (docs/algorithms.md, "Decoupled PPO"). Settings of a mode that is not on are refused."""
    r = c.rollout
    fully = r.async_mode == "fully-async"
    _first(
        [
            (
                not fully and (r.max_weight_staleness != 1 or r.stale_group_action != "regenerate"),
                "--max-weight-staleness and --stale-group-action bound the rollout worker of "
                "--async-mode fully-async (one-step-off trains every sample exactly one version behind)",
            ),
            (
                r.partial_rollout and not fully,
                "--partial-rollout continues the requests in flight at a weight update, which only "
                "--async-mode fully-async has (one-step-off and off update the weights between rollouts)",
            ),
            (
                r.pause_generation_mode != "in_place" and not r.partial_rollout,
                "--pause-generation-mode says how --partial-rollout pauses requests: give --partial-rollout",
            ),
        ]
    )
    if r.async_mode == "off" or c.algo.use_tis or c.algo.use_mis or c.algo.use_rollout_logprobs:
        return c  # (--use-rollout-logprobs is refused with a mode by check_async)
    return replace(c, algo=replace(c.algo, use_tis=True))


# --------------------------------------------------------------------------- checks, by concept


def check_engine_options(c: MilesConfig) -> None:
    """SGLang options: verbatim ones only where they reach a server, speculative decoding settings,
    and the engine's parallel sizes."""
    e, p = c.engine, c.placement
    problem = passthrough_problem(
        e.sglang_passthrough, p.rollout_backend, bool(p.rollout_external_engine_addrs)
    )
    if problem is not None:
        raise ConfigError(problem)
    speculative = (e.speculative_num_steps, e.speculative_eagle_topk, e.speculative_num_draft_tokens)
    tp = e.tp_size or 1
    _first(
        [
            (
                e.speculative_algorithm is None
                and (any(x is not None for x in speculative) or e.speculative_draft_model_path is not None),
                "--sglang-speculative-* settings need --sglang-speculative-algorithm",
            ),
            (
                tp % e.dp_size != 0 or tp % e.ep_size != 0,
                f"--sglang-dp-size ({e.dp_size}) and --sglang-ep-size ({e.ep_size}) must divide the engine's "
                f"tensor-parallel size {tp} (--rollout-num-gpus-per-engine)",
            ),
        ]
    )


def check_placement(c: MilesConfig) -> None:
    """Where the engines run, and the trainer's expert-parallel groups."""
    p, t, dp = c.placement, c.train, _dp_size(c)
    _first(
        [
            (
                p.colocate and bool(p.rollout_external_engine_addrs),
                "--colocate cannot share GPUs with engines at --rollout-external-engine-addrs",
            ),
            (
                dp % t.expert_model_parallel_size != 0,
                f"--expert-model-parallel-size {t.expert_model_parallel_size} must divide the trainer's "
                f"{dp} ranks (--actor-num-nodes × --actor-num-gpus-per-node)",
            ),
        ]
    )


def check_evaluation(c: MilesConfig) -> None:
    """``--eval-prompt-data`` as NAME PATH pairs, and the settings that need it."""
    r = c.rollout
    pairs, names = r.eval_prompt_data, r.eval_prompt_data[0::2]
    file_like = [x for x in names if x.endswith((".jsonl", ".parquet", ".json"))]
    _first(
        [
            (r.rollout_top_k == 0, "--rollout-top-k must be -1 (off) or >= 1, got 0"),
            (r.eval_top_k == 0, "--eval-top-k must be -1 (off) or >= 1, got 0"),
            (
                len(pairs) % 2 == 1,
                "--eval-prompt-data takes NAME PATH pairs (e.g. --eval-prompt-data aime aime.jsonl gsm gsm.jsonl), "
                f"got {len(pairs)} values: {' '.join(pairs)}",
            ),
            (
                bool(file_like),
                f"--eval-prompt-data takes NAME PATH pairs, name first; {file_like[:1]} looks like a file",
            ),
            (
                len(set(names)) != len(names),
                f"--eval-prompt-data names must be unique, got {' '.join(names)}",
            ),
            (
                r.eval_interval is not None and not pairs,
                "--eval-interval needs --eval-prompt-data NAME PATH ...",
            ),
        ]
    )


def check_algorithm(c: MilesConfig) -> None:
    """Off-policy corrections (TIS/MIS), KL, the advantage estimator and the critic."""
    a, t, r, m = c.algo, c.train, c.rollout, c.model
    lo, hi = a.mis_token_lower_bound, a.mis_token_upper_bound
    _first(
        [
            (
                a.tis_clip_low >= a.tis_clip,
                f"--tis-clip-low ({a.tis_clip_low}) must be < --tis-clip ({a.tis_clip})",
            ),
            (
                (lo is None) != (hi is None),
                "--mis-token-lower-bound and --mis-token-upper-bound go together: give both or neither",
            ),
            (
                lo is not None and lo >= (hi or 0),
                f"--mis-token-lower-bound ({lo}) must be < --mis-token-upper-bound ({hi})",
            ),
            (
                a.mis_seq_lower_bound >= a.mis_seq_upper_bound,
                f"--mis-seq-lower-bound ({a.mis_seq_lower_bound}) must be < --mis-seq-upper-bound ({a.mis_seq_upper_bound})",
            ),
            (
                a.tis_clip < 1,
                f"--tis-clip ({a.tis_clip}) must be >= 1: a ratio of 1 (no mismatch) must keep weight 1",
            ),
            (
                a.tis_clip_low > 1,
                f"--tis-clip-low ({a.tis_clip_low}) must be <= 1: a ratio of 1 must keep weight 1",
            ),
            (
                lo is not None and (lo > 1 or (hi or 1) < 1),
                f"--mis-token-lower-bound ({lo}) must be <= 1 <= --mis-token-upper-bound ({hi}): "
                "tokens without mismatch must be kept",
            ),
            (
                a.mis_seq_lower_bound > 1 or a.mis_seq_upper_bound < 1,
                f"--mis-seq-lower-bound ({a.mis_seq_lower_bound}) must be <= 1 <= --mis-seq-upper-bound "
                f"({a.mis_seq_upper_bound}): sequences without mismatch must be kept",
            ),
            (
                not a.use_mis and (lo is not None or a.mis_veto_threshold is not None),
                "--mis-token-lower-bound/--mis-token-upper-bound/--mis-veto-threshold have no effect without --use-mis",
            ),
            (
                a.use_mis and a.mis_seq_level == "none" and lo is None and a.mis_veto_threshold is None,
                "--use-mis with --mis-seq-level none masks nothing: give --mis-token-lower-bound and "
                "--mis-token-upper-bound, or --mis-veto-threshold",
            ),
            (
                (a.use_tis or a.use_mis) and a.use_rollout_logprobs,
                f"--{'use-tis' if a.use_tis else 'use-mis'} needs the rollout log-probs as a policy apart from the "
                "trainer's old one; with --use-rollout-logprobs they are the same and every weight is 1. Drop one",
            ),
            (
                a.kl_coef > 0 and a.kl_loss_coef > 0,
                "--kl-coef (KL as a reward penalty) and --kl-loss-coef (KL as a loss term) cannot both be non-zero",
            ),
            (
                a.kl_loss_coef > 0 and not a.use_kl_loss,
                f"--kl-loss-coef {a.kl_loss_coef} has no effect without --use-kl-loss",
            ),
            (
                a.advantage_estimator in GROUP_ESTIMATORS
                and r.n_samples_per_prompt < 2
                and t.loss_type == "policy_loss",
                f"--advantage-estimator {a.advantage_estimator} compares the samples of a prompt: with "
                "--n-samples-per-prompt 1 every advantage is 0; use 2 or more",
            ),
            (
                a.advantage_estimator == "ppo" and m.critic_load is None,
                "--advantage-estimator ppo trains a critic: give --critic-load PATH (e.g. the --hf-checkpoint path)",
            ),
            (
                a.advantage_estimator != "ppo"
                and (m.critic_load is not None or t.critic_lr is not None or t.num_critic_only_steps > 0),
                "--critic-load/--critic-lr/--num-critic-only-steps are only used with --advantage-estimator ppo",
            ),
        ]
    )


def check_training(c: MilesConfig) -> None:
    """The trainer's learning rate, batching and loss."""
    t, a, r, lg = c.train, c.algo, c.rollout, c.log
    _first(
        [
            (t.min_lr > t.lr, f"--min-lr ({t.min_lr}) must not exceed --lr ({t.lr})"),
            (
                t.use_dynamic_batch_size and t.max_tokens_per_gpu is None,
                "--use-dynamic-batch-size needs --max-tokens-per-gpu (the token budget of one micro-batch)",
            ),
            (
                t.loss_type == "sft_loss" and r.label_key is None and lg.load_debug_rollout_data is None,
                "--loss-type sft_loss trains on each prompt's label as the response: give --label-key KEY",
            ),
            (
                a.advantage_estimator == "ppo" and t.loss_type != "policy_loss",
                f"--advantage-estimator ppo needs --loss-type policy_loss (the critic's returns), got {t.loss_type}",
            ),
        ]
    )


def check_modes(c: MilesConfig) -> None:
    """True on-policy and routing replay (R2, R3)."""
    r, p, t = c.rollout, c.placement, c.train
    _first(
        [
            (
                c.true_on_policy_mode and (r.rollout_top_p < 1 or r.rollout_top_k != -1),
                "--true-on-policy-mode needs the full tempered distribution at sampling time (the trainer scores it): "
                "drop --rollout-top-p/--rollout-top-k",
            ),
            (
                c.true_on_policy_mode and p.rollout_backend == "sglang",
                "--true-on-policy-mode needs the built-in engine (--rollout-backend miles): "
                "an external SGLang server runs other kernels than the trainer",
            ),
            (
                c.use_rollout_routing_replay and t.use_routing_replay,
                "--use-rollout-routing-replay (R3: the engine's routing) and --use-routing-replay "
                "(R2: the trainer's) exclude each other",
            ),
            (
                t.use_routing_replay and c.algo.use_rollout_logprobs,
                "--use-routing-replay (R2) replays the old-log-prob forward's experts: it cannot be combined "
                "with --use-rollout-logprobs, which skips that forward",
            ),
        ]
    )


def check_async(c: MilesConfig) -> None:
    """Asynchronous modes: the engines generate while the trainer trains, so neither may sleep,
    and the trainer must recompute the proximal policy's log-probs itself."""
    r, p, a, lg = c.rollout, c.placement, c.algo, c.log
    if r.async_mode == "off":
        return
    mode = f"--async-mode {r.async_mode}"
    _first(
        [
            (
                bool(p.offload_train or p.offload_rollout),
                f"{mode} generates while the trainer trains: drop --colocate/--offload/--offload-train/"
                "--offload-rollout (on one GPU, share it with --sglang-mem-fraction-static)",
            ),
            (
                c.train.loss_type != "policy_loss",
                f"{mode} overlaps generation with RL training; --loss-type {c.train.loss_type} generates nothing",
            ),
            (
                lg.load_debug_rollout_data is not None or lg.debug_rollout_only,
                f"{mode} overlaps generation with training: --load-debug-rollout-data and "
                "--debug-rollout-only each do one of the two; use --async-mode off",
            ),
            (
                a.use_rollout_logprobs,
                f"{mode} trains with decoupled PPO, whose proximal policy is the trainer's recomputation: "
                "drop --use-rollout-logprobs",
            ),
            (
                p.update_weights_interval != 1,
                f"{mode} bounds how old the weights may be with --max-weight-staleness; "
                "drop --update-weights-interval",
            ),
            (
                r.partial_rollout and p.rollout_backend == "sglang",
                "--partial-rollout needs each token's weight version, which only the built-in engine reports "
                "(meta_info.output_token_weight_versions); use --rollout-backend miles",
            ),
        ]
    )


def check_runs(c: MilesConfig) -> None:
    """Debugging runs (saved rollouts) and checkpoints."""
    lg, ck = c.log, c.checkpoint
    _first(
        [
            (
                lg.debug_rollout_only and lg.debug_train_only,
                "--debug-rollout-only and --debug-train-only exclude each other: one skips training, the other rollout",
            ),
            (
                lg.debug_rollout_only and lg.load_debug_rollout_data is not None,
                "--load-debug-rollout-data replays saved rollouts instead of generating, so --debug-rollout-only "
                "would do nothing",
            ),
            (
                lg.debug_train_only and lg.load_debug_rollout_data is None,
                "--debug-train-only needs --load-debug-rollout-data (the saved rollouts to train on)",
            ),
            (ck.save_interval is not None and ck.save is None, "--save-interval needs --save DIR"),
            (
                ck.allow_fresh_start and ck.load is None,
                "--allow-fresh-start needs --load DIR (it allows --load to find no checkpoint yet)",
            ),
        ]
    )


def check_rewards(c: MilesConfig) -> None:
    """Reward functions and partial rollouts."""
    r = c.rollout
    _first(
        [
            (r.rm_type == "remote_rm" and r.rm_url is None, "--rm-type remote_rm needs --rm-url"),
            (
                r.group_rm and r.custom_rm_path is None,
                "--group-rm needs --custom-rm-path (a function scoring a group)",
            ),
            (
                r.mask_offpolicy_in_partial_rollout and not r.partial_rollout,
                "--mask-offpolicy-in-partial-rollout needs --partial-rollout",
            ),
        ]
    )


def check_sampling(c: MilesConfig) -> None:
    """The rollout's sampling settings against the engine's own bounds (``SamplingParams``), so a
    bad value fails at start, naming its flag, not in the first rollout."""
    r = c.rollout
    greedy = f"{GREEDY_TEMPERATURE:g}"
    if r.rollout_temperature < GREEDY_TEMPERATURE:
        raise ConfigError(
            f"--rollout-temperature must be >= {greedy}: RL trains on samples from the policy's "
            f"distribution, and the engine samples greedily below {greedy} (use --eval-temperature 0 "
            f"for greedy evaluation); got {r.rollout_temperature:g}"
        )
    if r.eval_temperature is not None and 0 < r.eval_temperature < GREEDY_TEMPERATURE:
        raise ConfigError(
            f"--eval-temperature {r.eval_temperature:g} is greedy in the engine (below {greedy}): give 0"
        )
    stops = r.rollout_stop
    if len(stops) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_STRING_CHARS for x in stops):
        raise ConfigError(
            f"--rollout-stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} "
            f"characters, got {len(stops)} (longest {max(map(len, stops), default=0)})"
        )
    if len(r.rollout_stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ConfigError(
            f"--rollout-stop-token-ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(r.rollout_stop_token_ids)}"
        )


# --------------------------------------------------------------------------- refused flags


def refuse_unbuilt(c: MilesConfig) -> None:
    """Refuse the settings Miles parses (under slime's names, so that launch scripts parse) but does
    not build, rather than ignore them: first those it never will, then those not built yet, all
    named in one message. Runs after :func:`resolve`, so a config that is also wrong hears that first.
    """
    m, t, a, r, e, p = c.model, c.train, c.algo, c.rollout, c.engine, c.placement
    ck, lg = c.checkpoint, c.log
    _first(
        [
            (
                m.trust_remote_code,
                "--trust-remote-code: Miles runs its own model code for every supported architecture and never "
                "runs code shipped with a checkpoint; drop the flag",
            ),
            (
                not t.balance_data,
                "--no-balance-data: Miles always balances the tokens of a step across data-parallel ranks; "
                "drop the flag",
            ),
        ]
    )
    # The engine's own list; its tp_size is --rollout-num-gpus-per-engine's (derived), named below, and
    # verbatim SGLang options reach no engine without --rollout-external-engine-addrs (below too).
    engine_unimplemented = replace(e, tp_size=None, sglang_passthrough={}).unimplemented()
    unbuilt = [
        (t.log_probs_max_tokens_per_gpu is not None, "--log-probs-max-tokens-per-gpu (log-prob passes use --max-tokens-per-gpu)"),
        (a.disable_rewards_normalization, "--disable-rewards-normalization"),
        (a.use_unbiased_kl, "--use-unbiased-kl"),
        (r.rollout_max_context_len is not None, "--rollout-max-context-len (use --rollout-max-response-len)"),
        *[(True, flag) for flag in engine_unimplemented],
        (e.router_ip is not None or e.router_port is not None, "--sglang-router-ip/--sglang-router-port "
         "(an existing router; Miles starts its own)"),
        (p.rollout_backend == "sglang" and not p.rollout_external_engine_addrs, "--rollout-backend sglang without "
         "--rollout-external-engine-addrs (Miles does not launch SGLang servers; point it at running ones)"),
        (p.rollout_num_gpus_per_engine != 1, f"--rollout-num-gpus-per-engine {p.rollout_num_gpus_per_engine} "
         "(the built-in engine runs on one device, without tensor parallelism; use more engines)"),
        (ck.no_save_optim, "--no-save-optim"),
        (lg.log_level != "info", f"--log-level {lg.log_level} (Miles logs its warnings and errors only)"),
    ]  # fmt: skip
    named = [flag for on, flag in unbuilt if on]
    if named:
        raise ConfigError(f"not implemented yet: {'; '.join(named)}; drop the flag(s)")


__all__ = ["GROUP_ESTIMATORS", "check_required", "refuse_unbuilt", "resolve"]

"""The configuration tree: flag layers, YAML files, precedence, derived values and validation."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from miles.config import (
    SPECS,
    ConfigError,
    EngineConfig,
    MilesConfig,
    RolloutConfig,
    config_to_yaml,
    parse_train_args,
)
from miles.config_rules import refuse_unbuilt
from miles.utils.sglang_options import SGLANG_OPTIONS, options_with_status

BASE = [
    "--hf-checkpoint", "model_dir",
    "--prompt-data", "prompts.jsonl",
    "--rollout-batch-size", "4",
    "--n-samples-per-prompt", "2",
    "--num-rollout", "3",
]  # fmt: skip


def parse(*extra: str) -> MilesConfig:
    return parse_train_args([*BASE, *extra])


def parse_unbuilt(*extra: str) -> MilesConfig:
    """``parse``, keeping the settings Miles parses but refuses to run (their plumbing is tested)."""
    return parse_train_args([*BASE, *extra], refuse_unbuilt=False)


def error_of(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_train_args(list(argv))
    return str(info.value)


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- the three layers


def test_training_backend_flags_under_usual_names() -> None:
    c = parse("--lr", "3e-6", "--micro-batch-size", "2", "--max-tokens-per-gpu", "4096", "--use-dynamic-batch-size",
              "--gradient-checkpointing", "--optimizer-cpu-offload", "--lr-decay-style", "cosine")  # fmt: skip
    assert (c.train.lr, c.train.micro_batch_size, c.train.max_tokens_per_gpu) == (3e-6, 2, 4096)
    assert c.train.use_dynamic_batch_size and c.train.gradient_checkpointing and c.train.optimizer_cpu_offload
    assert c.train.lr_decay_style == "cosine"


def test_engine_flags_with_sglang_prefix() -> None:
    c = parse_unbuilt("--sglang-mem-fraction-static", "0.7", "--sglang-page-size", "16",
                      "--sglang-max-running-requests", "64", "--sglang-cuda-graph-max-bs", "32",
                      "--sglang-disable-radix-cache", "--sglang-speculative-algorithm", "EAGLE",
                      "--sglang-speculative-num-steps", "3")  # fmt: skip
    e = c.engine
    assert (e.mem_fraction_static, e.page_size, e.max_running_requests, e.cuda_graph_max_bs) == (
        0.7,
        16,
        64,
        32,
    )
    assert e.disable_radix_cache and e.speculative_algorithm == "EAGLE" and e.speculative_num_steps == 3
    assert e.sglang_passthrough == {}


def test_miles_flags_with_slime_names() -> None:
    c = parse("--advantage-estimator", "gspo", "--eps-clip", "0.1", "--eps-clip-high", "0.28", "--use-kl-loss",
              "--kl-loss-coef", "0.01", "--kl-loss-type", "low_var_kl", "--use-tis", "--rollout-stop", "</s>", "\n\n",
              "--rollout-stop-token-ids", "1", "2", "--apply-chat-template-kwargs", '{"enable_thinking": false}',
              "--eval-prompt-data", "aime", "aime.jsonl", "gsm", "gsm.jsonl", "--colocate", "--true-on-policy-mode")  # fmt: skip
    assert c.algo.advantage_estimator == "gspo" and (c.algo.eps_clip, c.algo.eps_clip_high) == (0.1, 0.28)
    assert c.algo.use_kl_loss and c.algo.kl_loss_type == "low_var_kl" and c.algo.use_tis
    assert c.rollout.rollout_stop == ("</s>", "\n\n") and c.rollout.rollout_stop_token_ids == (1, 2)
    assert c.rollout.apply_chat_template_kwargs == {"enable_thinking": False}
    assert c.rollout.eval_datasets == [("aime", "aime.jsonl"), ("gsm", "gsm.jsonl")]
    assert c.placement.colocate and c.true_on_policy_mode


# slime/Miles defaults (reference/miles_slime.md §3.1-3.3), before any derivation.
SLIME_DEFAULTS = {
    "lr": 1e-6, "clip_grad": 1.0, "seed": 1234, "micro_batch_size": 1, "global_batch_size": None,
    "num_steps_per_rollout": None, "eps_clip": 0.2, "eps_clip_high": None, "eps_clip_c": None, "value_clip": 0.2,
    "kl_coef": 0.0, "kl_loss_coef": 0.0, "use_kl_loss": False, "kl_loss_type": "k1", "entropy_coef": 0.0,
    "advantage_estimator": "grpo", "loss_type": "policy_loss", "gamma": 1.0, "lambd": 1.0, "tis_clip": 2.0,
    "tis_clip_low": 0.0, "rollout_temperature": 1.0, "rollout_top_p": 1.0, "rollout_top_k": -1, "rollout_seed": 42,
    "n_samples_per_prompt": 1, "over_sampling_batch_size": None, "input_key": "input", "label_key": None,
    "metadata_key": "metadata", "tool_key": "tools", "n_samples_per_eval_prompt": 1, "num_critic_only_steps": 0,
    "update_weight_buffer_size": 512 * 1024**2, "update_weights_interval": 1, "actor_num_nodes": 1,
    "rollout_num_gpus_per_engine": 1, "rollout_health_check_interval": 30.0, "rollout_health_check_timeout": 30.0,
    "rollout_health_check_first_wait": 0.0, "sglang_server_concurrency": 512,
    "sglang_router_request_timeout_secs": 14400.0, "colocate": False, "calculate_per_token_loss": False,
}  # fmt: skip


@pytest.mark.parametrize(("key", "default"), SLIME_DEFAULTS.items())
def test_defaults_match_slime(key: str, default: object) -> None:
    assert SPECS[key].default == default


def test_derived_values() -> None:
    c = parse()
    assert c.train.global_batch_size == 8 and c.rollout.num_steps_per_rollout == 1
    assert c.rollout.over_sampling_batch_size == 4 and c.algo.eps_clip_high == 0.2
    assert c.engine.tp_size == 1 and c.engine.random_seed == 1234
    assert c.placement.offload_train is False and c.placement.offload_rollout is False
    c = parse("--num-steps-per-rollout", "2", "--colocate", "--true-on-policy-mode")
    assert c.train.global_batch_size == 4 and c.rollout.num_steps_per_rollout == 2
    assert c.placement.offload_train and c.placement.rollout_num_gpus == 1
    assert c.deterministic_mode and c.engine.enable_deterministic_inference
    c = parse("--global-batch-size", "2")
    assert c.rollout.num_steps_per_rollout == 4


def test_boolean_flags_have_a_no_form() -> None:
    c = parse("--colocate", "--no-colocate")
    assert c.placement.colocate is False


def test_configs_are_frozen() -> None:
    c = parse("--apply-chat-template-kwargs", '{"a": 1}')
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.rollout = RolloutConfig()  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.rollout.apply_chat_template_kwargs["a"] = 2  # type: ignore[index]
    assert RolloutConfig(rollout_stop=["x"]).rollout_stop == ("x",)  # type: ignore[arg-type]


def test_flat_keys_are_unique_and_every_field_has_help() -> None:
    root = MilesConfig()
    sections = [getattr(root, f.name) for f in dataclasses.fields(root)]
    fields = [f for s in sections if dataclasses.is_dataclass(s) for f in dataclasses.fields(s)]
    assert len(SPECS) > 150
    assert all(s.help for s in SPECS.values())
    assert len({s.key for s in SPECS.values()}) == len(SPECS) >= len(fields)


# --------------------------------------------------------------------------- SGLang options


def test_builtin_sglang_options_are_the_engine_fields() -> None:
    builtin = {o.name.replace("-", "_") for o in options_with_status("builtin")}
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert builtin <= fields
    client_side = {"server_concurrency", "router_ip", "router_port", "router_request_timeout_secs"}
    assert fields - builtin == client_side | {"sglang_passthrough"}
    assert len(options_with_status("passthrough")) >= 40


def test_sglang_passthrough_with_external_backend() -> None:
    c = parse_unbuilt("--rollout-backend", "sglang", "--sglang-attention-backend", "fa3",
                      "--sglang-enable-dp-attention", "--sglang-schedule-policy", "lpm", "--sglang-page-size", "32")  # fmt: skip
    assert c.engine.sglang_passthrough == {"attention-backend": "fa3", "enable-dp-attention": "true",
                                           "schedule-policy": "lpm"}  # fmt: skip
    args = c.engine.sglang_server_args()
    assert args[:2] == ["--page-size", "32"]
    assert args[-5:] == ["--attention-backend", "fa3", "--enable-dp-attention", "--schedule-policy", "lpm"]


def test_sglang_option_rejected_by_builtin_engine() -> None:
    msg = error_of(*BASE, "--sglang-attention-backend", "fa3")
    assert msg == (
        "--sglang-attention-backend is an SGLang server option that the built-in engine does not implement; "
        "--rollout-backend sglang passes it to an external SGLang server"
    )


def test_sglang_option_managed_by_miles() -> None:
    assert error_of(*BASE, "--rollout-backend", "sglang", "--sglang-model-path", "x") == (
        "--sglang-model-path is set by Miles itself; use --hf-checkpoint"
    )
    assert "--use-rollout-routing-replay" in error_of(*BASE, "--sglang-enable-return-routed-experts")


def test_sglang_passthrough_cannot_reach_running_engines() -> None:
    msg = error_of(*BASE, "--rollout-backend", "sglang", "--rollout-external-engine-addrs", "h:1",
                   "--sglang-quantization", "fp8")  # fmt: skip
    assert msg.startswith("--sglang-quantization cannot reach the engines at --rollout-external-engine-addrs")


def test_unknown_sglang_option_suggests_closest() -> None:
    msg = error_of(*BASE, "--sglang-atention-backend", "fa3")
    assert msg == (
        "unrecognized argument --sglang-atention-backend: neither a Miles flag nor a known SGLang option; "
        "did you mean --sglang-attention-backend?"
    )


def test_every_table_option_parses_with_external_backend() -> None:
    argv = [*BASE, "--rollout-backend", "sglang"]
    for o in options_with_status("passthrough"):
        argv += [o.flag, "1"] if o.takes_value else [o.flag]
    c = parse_train_args(argv, refuse_unbuilt=False)
    assert set(c.engine.sglang_passthrough) == {o.name for o in options_with_status("passthrough")}
    assert all(" " not in name and not name.startswith("-") for name in SGLANG_OPTIONS)


# --------------------------------------------------------------------------- YAML files


def test_yaml_flat_keys_in_both_spellings(tmp_path: Path) -> None:
    path = write(tmp_path, "hf_checkpoint: m\nprompt-data: p.jsonl\nrollout_batch_size: 8\nn-samples-per-prompt: 4\n"
                           "num_rollout: 2\nlr: 1e-5\nsglang-page-size: 16\nuse_kl_loss: true\n")  # fmt: skip
    c = parse_train_args(["--config", path])
    assert (c.rollout.rollout_batch_size, c.rollout.n_samples_per_prompt, c.engine.page_size) == (8, 4, 16)
    assert c.train.lr == 1e-5 and c.algo.use_kl_loss  # "1e-5" is a string to YAML 1.1; accepted for floats


def test_yaml_nested_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "model: {hf_checkpoint: m}\nrollout:\n  prompt_data: p.jsonl\n  rollout_batch_size: 2\n"
                           "  n_samples_per_prompt: 2\n  num_rollout: 1\nengine:\n  mem_fraction_static: 0.5\n"
                           "  sglang_max_running_requests: 8\nplacement: {rollout_backend: sglang}\n"
                           "sglang_passthrough: {attention-backend: triton}\n")  # fmt: skip
    c = parse_train_args(["--config", path], refuse_unbuilt=False)
    assert c.engine.mem_fraction_static == 0.5 and c.engine.max_running_requests == 8
    assert c.engine.sglang_passthrough == {"attention-backend": "triton"}


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "lr: 2.0e-6\ncolocate: true\neps_clip: 0.3\n")
    c = parse("--config", path, "--lr", "5e-6", "--no-colocate")
    assert (c.train.lr, c.placement.colocate, c.algo.eps_clip) == (5e-6, False, 0.3)
    c = parse("--lr", "5e-6", "--config", path)  # the order on the command line does not matter
    assert c.train.lr == 5e-6


def test_yaml_passthrough_switches_and_values(tmp_path: Path) -> None:
    path = write(tmp_path, "rollout_backend: sglang\nsglang_enable_torch_compile: true\n"
                           "sglang-disable-overlap-schedule: false\nsglang_schedule_conservativeness: 0.5\n")  # fmt: skip
    c = parse_unbuilt("--config", path)
    assert c.engine.sglang_passthrough == {"enable-torch-compile": "true", "schedule-conservativeness": "0.5"}


def test_dry_run_yaml_round_trips(tmp_path: Path) -> None:
    c = parse_unbuilt("--rollout-backend", "sglang", "--sglang-attention-backend", "fa3", "--sglang-enable-dp-attention",
                      "--rollout-stop", "</s>", "--apply-chat-template-kwargs", '{"enable_thinking": false}', "--lr",
                      "1e-5", "--colocate", "--eval-prompt-data", "aime", "a.jsonl", "--eval-interval", "5",
                      "--use-mis")  # fmt: skip
    again = parse_train_args(["--config", write(tmp_path, config_to_yaml(c))], refuse_unbuilt=False)
    assert again == c
    assert (
        parse_train_args(["--config", write(tmp_path, config_to_yaml(again), "2.yaml")], refuse_unbuilt=False)
        == c
    )


YAML_ERRORS = [
    ("rollout_batchsize: 4\n", "run.yaml: unknown key 'rollout_batchsize'; did you mean rollout_batch_size?"),
    ("rollout-batchsize: 4\n", "run.yaml: unknown key 'rollout-batchsize'; did you mean rollout-batch-size?"),
    ("train: {rollout_batchsize: 4}\n", "unknown key 'rollout_batchsize'; did you mean rollout_batch_size?"),
    (
        "rollout_batch_size: four\n",
        "run.yaml: key 'rollout_batch_size' expects an integer or null, got 'four'",
    ),
    ("n_samples_per_prompt: 2.5\n", "key 'n_samples_per_prompt' expects an integer, got 2.5"),
    ("colocate: yes please\n", "key 'colocate' expects a boolean (true/false), got 'yes please'"),
    ("lr: fast\n", "key 'lr' expects a number, got 'fast'"),
    ("kl_loss_type: k9\n", "key 'kl_loss_type' expects one of k1, k2, k3, low_var_kl, got 'k9'"),
    ("input_key: 3\n", "key 'input_key' expects a string, got 3"),
    ("rollout_stop_token_ids: [1, x]\n", "key 'rollout_stop_token_ids' expects a list of int values"),
    ("apply_chat_template_kwargs: 3\n", "key 'apply_chat_template_kwargs' expects a mapping"),
    ("- lr\n", "run.yaml: expected a mapping of keys to values, got list"),
    ("lr: [\n", "invalid YAML"),
    ("sglang_attention_backend: [a, b]\n", "key 'sglang-attention-backend' expects a single value"),
    (
        "sglang_enable_torch_compile: maybe\n",
        "key 'sglang-enable-torch-compile' is a switch and expects true or false",
    ),
]


@pytest.mark.parametrize(("text", "message"), YAML_ERRORS)
def test_yaml_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    msg = error_of(*BASE, "--config", path)
    assert message in msg
    assert path in msg or "run.yaml" not in message


def test_missing_config_file(tmp_path: Path) -> None:
    assert (
        error_of("--config", str(tmp_path / "nope.yaml"))
        == f"--config {tmp_path / 'nope.yaml'}: No such file or directory"
    )


# --------------------------------------------------------------------------- validation messages

# (extra flags after BASE, the exact message). Each message of config_rules and of the bounds.
VALIDATION = [
    # value ranges
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--eps-clip", "-0.1"], "--eps-clip must be >= 0, got -0.1"),
    (["--rollout-temperature", "-1"], "--rollout-temperature must be >= 0, got -1.0"),
    (["--rollout-top-p", "0"], "--rollout-top-p must be in (0, 1], got 0.0"),
    (["--rollout-top-k", "-2"], "--rollout-top-k must be >= -1, got -2"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1.0"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
    (["--eps-clip-c", "0.5"], "--eps-clip-c must be > 1, got 0.5"),
    (["--eval-interval", "0"], "--eval-interval must be >= 1, got 0"),
    (["--save", "d", "--save-interval", "0"], "--save-interval must be >= 1, got 0"),
    (["--sglang-mem-fraction-static", "1.5"], "--sglang-mem-fraction-static must be in (0, 1], got 1.5"),
    (["--use-mis", "--mis-veto-threshold", "2"], "--mis-veto-threshold must be in (0, 1), got 2.0"),
    (["--rollout-temperature", "0"], "--rollout-temperature must be >= 1e-06: RL trains on samples from the policy's "
                                     "distribution, and the engine samples greedily below 1e-06 (use --eval-temperature 0 "
                                     "for greedy evaluation); got 0"),
    (["--rollout-temperature", "1e-9"], "--rollout-temperature must be >= 1e-06: RL trains on samples from the "
                                        "policy's distribution, and the engine samples greedily below 1e-06 (use "
                                        "--eval-temperature 0 for greedy evaluation); got 1e-09"),
    (["--eval-temperature", "1e-9"], "--eval-temperature 1e-09 is greedy in the engine (below 1e-06): give 0"),
    (["--rollout-stop", *(["x"] * 65)], "--rollout-stop takes at most 64 strings of at most 1024 characters, got 65 "
                                        "(longest 1)"),
    (["--rollout-stop", "x" * 1025], "--rollout-stop takes at most 64 strings of at most 1024 characters, got 1 "
                                     "(longest 1025)"),
    (["--rollout-stop-token-ids", *(["1"] * 1025)], "--rollout-stop-token-ids takes at most 1024 ids, got 1025"),
    (["--rollout-top-k", "0"], "--rollout-top-k must be -1 (off) or >= 1, got 0"),
    (["--eval-top-k", "0"], "--eval-top-k must be -1 (off) or >= 1, got 0"),
    (["--min-lr", "1e-5"], "--min-lr (1e-05) must not exceed --lr (1e-06)"),
    (["--tis-clip-low", "2"], "--tis-clip-low (2.0) must be < --tis-clip (2.0)"),
    # batch sizes
    (["--over-sampling-batch-size", "2"], "--over-sampling-batch-size (2) must be >= --rollout-batch-size (4): it is "
                                          "the number of prompts drawn at a time while the filters fill a rollout batch"),
    (["--global-batch-size", "3"], "--rollout-batch-size × --n-samples-per-prompt = 4 × 2 = 8 samples per rollout "
                                   "must be a multiple of --global-batch-size 3 (whole optimizer steps)"),
    (["--num-steps-per-rollout", "3"], "--rollout-batch-size × --n-samples-per-prompt = 4 × 2 = 8 samples per rollout "
                                       "cannot be split into --num-steps-per-rollout 3 equal optimizer steps"),
    (["--global-batch-size", "4", "--num-steps-per-rollout", "4"],
     "--num-steps-per-rollout 4 disagrees with --global-batch-size 4: 8 samples per rollout / 4 = 2 steps; "
     "give only one of the two"),
    (["--actor-num-gpus-per-node", "3"], "--global-batch-size 8 must be divisible by --micro-batch-size × "
     "data-parallel size = 1 × 3 = 3 (data-parallel size = --actor-num-nodes 1 × --actor-num-gpus-per-node 3)"),
    (["--actor-num-gpus-per-node", "3", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "64"],
     "--global-batch-size 8 must be divisible by the data-parallel size 3 "
     "(--actor-num-nodes 1 × --actor-num-gpus-per-node 3)"),
    (["--global-batch-size", "8", "--micro-batch-size", "3"], "--global-batch-size 8 must be divisible by "
     "--micro-batch-size × data-parallel size = 3 × 1 = 3"),
    (["--eval-prompt-data", "aime", "a.jsonl", "gsm"], "--eval-prompt-data takes NAME PATH pairs (e.g. "
     "--eval-prompt-data aime aime.jsonl gsm gsm.jsonl), got 3 values: aime a.jsonl gsm"),
    (["--eval-prompt-data", "a.jsonl", "aime"], "--eval-prompt-data takes NAME PATH pairs, name first; "
     "['a.jsonl'] looks like a file"),
    (["--eval-prompt-data", "a", "x.jsonl", "a", "y.jsonl"], "--eval-prompt-data names must be unique, got a a"),
    (["--eval-interval", "5"], "--eval-interval needs --eval-prompt-data NAME PATH ..."),
    # placement
    (["--colocate", "--rollout-num-gpus", "2"], "--colocate runs the engines on the trainer's GPUs, so "
     "--rollout-num-gpus (2) must equal --actor-num-nodes × --actor-num-gpus-per-node (1)"),
    (["--rollout-num-gpus", "3", "--rollout-num-gpus-per-engine", "2"],
     "--rollout-num-gpus (3) must be a multiple of --rollout-num-gpus-per-engine (2)"),
    (["--sglang-tp-size", "2"], "--sglang-tp-size 2 disagrees with --rollout-num-gpus-per-engine 1: an engine's "
     "tensor-parallel group spans its GPUs; set --rollout-num-gpus-per-engine only"),
    (["--sglang-dp-size", "2"], "--sglang-dp-size (2) and --sglang-ep-size (1) must divide the engine's "
     "tensor-parallel size 1 (--rollout-num-gpus-per-engine)"),
    (["--colocate", "--rollout-external-engine-addrs", "h:1"],
     "--colocate cannot share GPUs with engines at --rollout-external-engine-addrs"),
    (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size 2 must divide the trainer's 1 ranks "
     "(--actor-num-nodes × --actor-num-gpus-per-node)"),
    # modes
    (["--true-on-policy-mode", "--no-deterministic-mode"],
     "--true-on-policy-mode needs deterministic kernels: drop --no-deterministic-mode"),
    (["--deterministic-mode", "--no-sglang-enable-deterministic-inference"],
     "--deterministic-mode needs a deterministic engine: drop --no-sglang-enable-deterministic-inference"),
    (["--true-on-policy-mode", "--rollout-backend", "sglang"], "--true-on-policy-mode needs the built-in engine "
     "(--rollout-backend miles): an external SGLang server runs other kernels than the trainer"),
    (["--use-rollout-routing-replay", "--use-routing-replay"], "--use-rollout-routing-replay (R3: the engine's "
     "routing) and --use-routing-replay (R2: the trainer's) exclude each other"),
    (["--use-routing-replay", "--use-rollout-logprobs"], "--use-routing-replay (R2) replays the old-log-prob "
     "forward's experts: it cannot be combined with --use-rollout-logprobs, which skips that forward"),
    (["--sglang-speculative-num-steps", "3"], "--sglang-speculative-* settings need --sglang-speculative-algorithm"),
    # algorithm
    (["--mis-token-lower-bound", "0.5", "--use-mis"],
     "--mis-token-lower-bound and --mis-token-upper-bound go together: give both or neither"),
    (["--use-mis", "--mis-token-lower-bound", "2", "--mis-token-upper-bound", "1"],
     "--mis-token-lower-bound (2.0) must be < --mis-token-upper-bound (1.0)"),
    (["--use-mis", "--mis-seq-lower-bound", "1.1"], "--mis-seq-lower-bound (1.1) must be < --mis-seq-upper-bound (1.001)"),
    (["--mis-veto-threshold", "1e-4"], "--mis-token-lower-bound/--mis-token-upper-bound/--mis-veto-threshold "
     "have no effect without --use-mis"),
    (["--use-mis", "--mis-seq-level", "none"], "--use-mis with --mis-seq-level none masks nothing: give "
     "--mis-token-lower-bound and --mis-token-upper-bound, or --mis-veto-threshold"),
    (["--use-tis", "--use-rollout-logprobs"], "--use-tis needs the rollout log-probs as a policy apart from the "
     "trainer's old one; with --use-rollout-logprobs they are the same and every weight is 1. Drop one"),
    (["--use-mis", "--use-rollout-logprobs"], "--use-mis needs the rollout log-probs as a policy apart from the "
     "trainer's old one; with --use-rollout-logprobs they are the same and every weight is 1. Drop one"),
    (["--kl-coef", "0.1", "--use-kl-loss", "--kl-loss-coef", "0.1"], "--kl-coef (KL as a reward penalty) and "
     "--kl-loss-coef (KL as a loss term) cannot both be non-zero"),
    (["--kl-loss-coef", "0.01"], "--kl-loss-coef 0.01 has no effect without --use-kl-loss"),
    (["--n-samples-per-prompt", "1"], "--advantage-estimator grpo compares the samples of a prompt: with "
     "--n-samples-per-prompt 1 every advantage is 0; use 2 or more"),
    (["--advantage-estimator", "ppo"], "--advantage-estimator ppo trains a critic: give --critic-load PATH "
     "(e.g. the --hf-checkpoint path)"),
    (["--critic-lr", "1e-5"], "--critic-load/--critic-lr/--num-critic-only-steps are only used with "
     "--advantage-estimator ppo"),
    (["--use-dynamic-batch-size"], "--use-dynamic-batch-size needs --max-tokens-per-gpu (the token budget of one "
     "micro-batch)"),
    # rewards, rollout, debugging, checkpoints
    (["--rm-type", "remote_rm"], "--rm-type remote_rm needs --rm-url"),
    (["--group-rm"], "--group-rm needs --custom-rm-path (a function scoring a group)"),
    (["--mask-offpolicy-in-partial-rollout"], "--mask-offpolicy-in-partial-rollout needs --partial-rollout"),
    # asynchronous RL
    (["--max-weight-staleness", "2"], "--max-weight-staleness and --stale-group-action bound the rollout worker of "
     "--async-mode fully-async"),
    (["--async-mode", "one-step-off", "--stale-group-action", "drop"], "--max-weight-staleness and "
     "--stale-group-action bound the rollout worker of --async-mode fully-async"),
    (["--async-mode", "one-step-off", "--partial-rollout"], "--partial-rollout continues the requests in flight at a "
     "weight update, which only --async-mode fully-async has"),
    (["--async-mode", "fully-async", "--pause-generation-mode", "retract"], "--pause-generation-mode says how "
     "--partial-rollout pauses requests: give --partial-rollout"),
    (["--async-mode", "fully-async", "--colocate"], "--async-mode fully-async generates while the trainer trains: "
     "drop --colocate/--offload/--offload-train/--offload-rollout"),
    (["--async-mode", "one-step-off", "--offload-rollout"], "--async-mode one-step-off generates while the trainer "
     "trains"),
    (["--async-mode", "fully-async", "--loss-type", "sft_loss", "--label-key", "y"], "--async-mode fully-async overlaps generation with "
     "RL training; --loss-type sft_loss generates nothing"),
    (["--async-mode", "fully-async", "--debug-rollout-only"], "--async-mode fully-async overlaps generation with "
     "training: --load-debug-rollout-data and --debug-rollout-only each do one of the two"),
    (["--async-mode", "fully-async", "--use-rollout-logprobs"], "--async-mode fully-async trains with decoupled "
     "PPO, whose proximal policy is the trainer's recomputation: drop --use-rollout-logprobs"),
    (["--async-mode", "one-step-off", "--update-weights-interval", "2"], "--async-mode one-step-off bounds how old "
     "the weights may be with --max-weight-staleness; drop --update-weights-interval"),
    (["--async-mode", "fully-async", "--partial-rollout", "--rollout-backend", "sglang",
      "--rollout-external-engine-addrs", "h:1"], "--partial-rollout needs each token's weight version"),
    (["--async-mode", "async"], "argument --async-mode: invalid choice: 'async'"),
    (["--debug-rollout-only", "--debug-train-only"], "--debug-rollout-only and --debug-train-only exclude each "
     "other: one skips training, the other rollout"),
    (["--debug-rollout-only", "--load-debug-rollout-data", "d"], "--load-debug-rollout-data replays saved rollouts "
     "instead of generating, so --debug-rollout-only would do nothing"),
    (["--debug-train-only"], "--debug-train-only needs --load-debug-rollout-data (the saved rollouts to train on)"),
    (["--save-interval", "5"], "--save-interval needs --save DIR"),
    (["--allow-fresh-start"], "--allow-fresh-start needs --load DIR (it allows --load to find no checkpoint yet)"),
    (["--advantage-estimator", "ppo", "--critic-load", "m", "--loss-type", "sft_loss", "--label-key", "y"],
     "--advantage-estimator ppo needs --loss-type policy_loss (the critic's returns), got sft_loss"),
    (["--loss-type", "sft_loss", "--n-samples-per-prompt", "1"], "--loss-type sft_loss trains on each prompt's "
     "label as the response: give --label-key KEY"),
    # the parser itself
    (["--rollout-batchsize", "3"], "unrecognized argument --rollout-batchsize; did you mean --rollout-batch-size?"),
    (["--moe-aux-loss-cof", "0.1"], "unrecognized argument --moe-aux-loss-cof; did you mean --moe-aux-loss-coef?"),
    (["stray"], "unexpected argument 'stray'"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--advantage-estimator", "a2c"], "argument --advantage-estimator: invalid choice: 'a2c'"),
    (["--apply-chat-template-kwargs", "{bad"], "argument --apply-chat-template-kwargs: invalid JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), VALIDATION, ids=[" ".join(e)[:60] for e, _ in VALIDATION])
def test_validation_message(extra: list[str], message: str) -> None:
    msg = error_of(*BASE, *extra)
    assert msg == message or msg.startswith(message), msg


# Flags the parser accepts (slime's names) that Miles refuses, rather than ignore, when set: at
# parse time, so --dry-run and library callers refuse them too (before: the loop's preflight
# refused some; --trust-remote-code, --no-balance-data, --log-level and a multi-GPU engine on the
# local placement were accepted and ignored).
REFUSED = [
    (["--trust-remote-code"], "--trust-remote-code: Miles runs its own model code for every supported architecture "
     "and never runs code shipped with a checkpoint; drop the flag"),
    (["--no-balance-data"], "--no-balance-data: Miles always balances the tokens of a step across data-parallel "
     "ranks; drop the flag"),
    (["--log-probs-max-tokens-per-gpu", "64"], "not implemented yet: --log-probs-max-tokens-per-gpu (log-prob passes "
     "use --max-tokens-per-gpu); drop the flag(s)"),
    (["--disable-rewards-normalization"], "not implemented yet: --disable-rewards-normalization; drop the flag(s)"),
    (["--rollout-max-context-len", "64"], "not implemented yet: --rollout-max-context-len (use "
     "--rollout-max-response-len); drop the flag(s)"),
    (["--sglang-chunked-prefill-size", "64"], "not implemented yet: --sglang-chunked-prefill-size"),
    (["--sglang-speculative-algorithm", "EAGLE"], "not implemented yet: --sglang-speculative-algorithm"),
    (["--sglang-router-port", "9000"], "not implemented yet: --sglang-router-ip/--sglang-router-port (an existing "
     "router; Miles starts its own); drop the flag(s)"),
    (["--rollout-backend", "sglang"], "not implemented yet: --rollout-backend sglang without "
     "--rollout-external-engine-addrs (Miles does not launch SGLang servers; point it at running ones); drop the flag(s)"),
    (["--rollout-num-gpus-per-engine", "2"], "not implemented yet: --rollout-num-gpus-per-engine 2 (the built-in "
     "engine runs on one device, without tensor parallelism; use more engines); drop the flag(s)"),
    (["--log-level", "debug"], "not implemented yet: --log-level debug (Miles logs its warnings and errors only); "
     "drop the flag(s)"),
    (["--no-save-optim", "--use-unbiased-kl"], "not implemented yet: --use-unbiased-kl; --no-save-optim; "
     "drop the flag(s)"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), REFUSED, ids=[" ".join(e)[:60] for e, _ in REFUSED])
def test_flags_not_built_are_refused_when_parsed(extra: list[str], message: str) -> None:
    msg = error_of(*BASE, *extra)
    assert msg == message or msg.startswith(message), msg


def test_a_wrong_config_hears_the_rule_before_the_refusal() -> None:
    assert error_of(*BASE, "--use-unbiased-kl", "--colocate", "--rollout-external-engine-addrs", "h:1") == (
        "--colocate cannot share GPUs with engines at --rollout-external-engine-addrs"
    )


def test_refusals_can_be_deferred_but_not_skipped() -> None:
    """``refuse_unbuilt=False`` keeps such a config for tools; the run's preflight refuses it."""
    c = parse_unbuilt("--use-unbiased-kl", "--trust-remote-code")
    assert c.algo.use_unbiased_kl and c.model.trust_remote_code
    with pytest.raises(ConfigError, match="--trust-remote-code: Miles runs its own model code"):
        refuse_unbuilt(c)
    assert parse().train.balance_data is True  # what Miles does, so the resolved config says so


REQUIRED = [
    ("--hf-checkpoint", "--hf-checkpoint is required: the policy model (a Hugging Face directory or a .gguf file)"),
    ("--rollout-batch-size", "--rollout-batch-size is required: the number of prompts per rollout step"),
    ("--prompt-data", "--prompt-data is required (a .jsonl or .parquet file of prompts), unless "
                      "--load-debug-rollout-data replays saved rollouts"),
    ("--num-rollout", "give --num-rollout N (the number of RL steps) or --num-epoch N (passes over --prompt-data)"),
]  # fmt: skip


@pytest.mark.parametrize(("missing", "message"), REQUIRED)
def test_required_settings(missing: str, message: str) -> None:
    i = BASE.index(missing)
    assert error_of(*BASE[:i], *BASE[i + 2 :]) == message


def test_replayed_rollouts_need_no_prompt_data() -> None:
    i = BASE.index("--prompt-data")
    c = parse_train_args([*BASE[:i], *BASE[i + 2 :], "--debug-train-only", "--load-debug-rollout-data", "d"])
    assert c.rollout.prompt_data is None and c.log.debug_train_only


def test_docs_name_only_real_flags() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]\b(?!-)", doc))
    known = {s.flag for s in SPECS.values()} | {o.flag for o in SGLANG_OPTIONS.values()}
    known |= {"--no-" + s.flag[2:] for s in SPECS.values()} | {"--config", "--dry-run", "--debug"}
    slime_flags_mentioned = {"--custom-config-path"}
    misspelled_on_purpose = {"--rollout-temp", "--rollout-batchsize"}  # examples of errors
    assert flags - known - slime_flags_mentioned - misspelled_on_purpose == set()
    assert all(s.flag in doc for s in SPECS.values() if s.cli)


# --------------------------------------------------------------------------- review fixes

REVIEW_BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rollout-batch-size", "4",
               "--num-rollout", "5", "--n-samples-per-prompt", "2"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--use-tis", "--tis-clip", "0.5"], "--tis-clip (0.5) must be >= 1"),
        (["--use-tis", "--tis-clip-low", "1.5", "--tis-clip", "3"], "--tis-clip-low (1.5) must be <= 1"),
        (["--use-mis", "--mis-token-lower-bound", "1.2", "--mis-token-upper-bound", "2"],
         "--mis-token-lower-bound (1.2) must be <= 1 <= --mis-token-upper-bound (2.0)"),
        (["--use-mis", "--mis-seq-lower-bound", "1.01", "--mis-seq-upper-bound", "1.05"],
         "--mis-seq-lower-bound (1.01) must be <= 1 <= --mis-seq-upper-bound (1.05)"),
        (["--true-on-policy-mode", "--rollout-top-p", "0.9"], "--true-on-policy-mode needs the full tempered"),
        (["--true-on-policy-mode", "--rollout-top-k", "5"], "--true-on-policy-mode needs the full tempered"),
    ],
)  # fmt: skip
def test_review_validation_holes(extra, message):
    with pytest.raises(ConfigError) as info:
        parse_train_args([*REVIEW_BASE, *extra])
    assert message in str(info.value)


def test_rpp_baseline_needs_groups_and_decay_iters_default_to_the_run():
    with pytest.raises(ConfigError, match="every advantage is 0"):
        parse_train_args([*REVIEW_BASE[:-1], "1", "--advantage-estimator", "reinforce_plus_plus_baseline"])
    cfg = parse_train_args([*REVIEW_BASE, "--lr-decay-style", "cosine", "--global-batch-size", "4"])
    assert cfg.train.lr_decay_iters == 10
    no_rollouts = [a for a in REVIEW_BASE if a not in ("--num-rollout", "5")]
    with pytest.raises(ConfigError, match="--lr-decay-style cosine needs --lr-decay-iters, or --num-rollout"):
        parse_train_args([*no_rollouts, "--num-epoch", "1", "--lr-decay-style", "cosine"])


def test_a_flag_named_no_something_can_be_switched_on() -> None:
    """slime's ``--no-save-optim`` is a flag of its own; argparse's BooleanOptionalAction read
    every ``--no-`` prefix as "False", so it could never be set."""
    assert parse_unbuilt("--no-save-optim").checkpoint.no_save_optim is True  # then refused: not built
    assert parse_train_args([*BASE, "--no-no-save-optim"]).checkpoint.no_save_optim is False
    assert parse_train_args([*BASE, "--colocate", "--no-colocate"]).placement.colocate is False


def test_moe_loss_flags_take_both_spellings() -> None:
    """Megatron/slime spell ``--moe-aux-loss-coeff``; the MoE issue (and others) ``-coef``."""
    c = parse_train_args([*BASE, "--moe-aux-loss-coef", "0.01", "--moe-z-loss-coef", "0.001"])
    assert (c.train.moe_aux_loss_coeff, c.train.moe_z_loss_coeff) == (0.01, 0.001)
    assert parse_train_args([*BASE, "--moe-aux-loss-coeff", "0.02"]).train.moe_aux_loss_coeff == 0.02

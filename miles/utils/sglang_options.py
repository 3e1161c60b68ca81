"""The SGLang server options Miles knows by name, and what the built-in engine does with each.

Miles exposes engine options as ``--sglang-<name>`` with SGLang's own names (DESIGN §3). Each
known option has one of three statuses:

- ``builtin``: a typed field of ``EngineConfig``; the built-in engine implements it, or refuses it
  by name when set (``EngineConfig.unimplemented``: speculative decoding, parallelism in an engine);
- ``passthrough``: a real SGLang option the built-in engine does not implement; it is rejected
  with ``--rollout-backend miles`` and passed verbatim to the server with ``--rollout-backend sglang``;
- ``managed``: Miles sets it itself (ports, model path, memory saver...), so the user may not.

A ``--sglang-X`` whose X is in none of these is an unknown flag. The table is not every SGLang
option (SGLang has hundreds, and they change between releases); it holds the ones people pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from miles.utils.dataclass_flags import ConfigError

Status = Literal["builtin", "passthrough", "managed"]


@dataclass(frozen=True)
class SGLangOption:
    """One SGLang server option: whether it takes a value, and how Miles treats it."""

    name: str  # SGLang's CLI spelling without dashes in front, e.g. "attention-backend"
    takes_value: bool  # False for store_true options such as "enable-dp-attention"
    status: Status
    miles_flag: str = ""  # for "managed": the Miles flag that controls it

    @property
    def flag(self) -> str:
        """The Miles spelling: ``--sglang-<name>``."""
        return f"--sglang-{self.name}"


_V, _F = True, False  # takes a value / is a boolean switch

_BUILTIN: list[tuple[str, bool]] = [
    ("mem-fraction-static", _V),
    ("page-size", _V),
    ("max-running-requests", _V),
    ("max-total-tokens", _V),
    ("max-prefill-tokens", _V),
    ("max-queued-requests", _V),
    ("chunked-prefill-size", _V),
    ("cuda-graph-max-bs", _V),
    ("disable-cuda-graph", _F),
    ("disable-overlap-schedule", _F),
    ("context-length", _V),
    ("disable-radix-cache", _F),
    ("random-seed", _V),
    ("enable-deterministic-inference", _F),
    ("speculative-algorithm", _V),
    ("speculative-draft-model-path", _V),
    ("speculative-num-steps", _V),
    ("speculative-eagle-topk", _V),
    ("speculative-num-draft-tokens", _V),
    ("tp-size", _V),
    ("dp-size", _V),
    ("ep-size", _V),
    ("log-level", _V),
]

_PASSTHROUGH: list[tuple[str, bool]] = [
    # model loading and numerics
    ("tokenizer-path", _V),
    ("tokenizer-mode", _V),
    ("load-format", _V),
    ("revision", _V),
    ("download-dir", _V),
    ("quantization", _V),
    ("kv-cache-dtype", _V),
    ("json-model-override-args", _V),
    ("enable-fp32-lm-head", _F),
    ("served-model-name", _V),
    ("chat-template", _V),
    ("skip-tokenizer-init", _F),
    ("is-embedding", _F),
    ("device", _V),
    ("host", _V),
    ("api-key", _V),
    # kernels and backends
    ("attention-backend", _V),
    ("prefill-attention-backend", _V),
    ("decode-attention-backend", _V),
    ("mm-attention-backend", _V),
    ("sampling-backend", _V),
    ("grammar-backend", _V),
    ("moe-runner-backend", _V),
    ("moe-a2a-backend", _V),
    ("deepep-mode", _V),
    ("triton-attention-reduce-in-fp32", _F),
    ("triton-attention-num-kv-splits", _V),
    ("enable-torch-compile", _F),
    ("torch-compile-max-bs", _V),
    ("disable-cuda-graph-padding", _F),
    ("disable-custom-all-reduce", _F),
    ("enable-nccl-nvls", _F),
    ("enable-symm-mem", _F),
    ("enable-p2p-check", _F),
    ("rl-on-policy-target", _V),
    # scheduling and memory
    ("schedule-policy", _V),
    ("schedule-conservativeness", _V),
    ("stream-interval", _V),
    ("num-continuous-decode-steps", _V),
    ("cpu-offload-gb", _V),
    ("enable-mixed-chunk", _F),
    ("enable-hierarchical-cache", _F),
    ("hicache-ratio", _V),
    ("disable-chunked-prefix-cache", _F),
    ("allow-auto-truncate", _F),
    ("watchdog-timeout", _V),
    ("delete-ckpt-after-loading", _F),
    # parallelism
    ("pp-size", _V),
    ("enable-dp-attention", _F),
    ("enable-dp-lm-head", _F),
    ("load-balance-method", _V),
    ("enable-two-batch-overlap", _F),
    ("enable-eplb", _F),
    ("ep-num-redundant-experts", _V),
    # speculative decoding extras
    ("speculative-accept-threshold-single", _V),
    ("speculative-accept-threshold-acc", _V),
    ("speculative-token-map", _V),
    ("enable-double-sparsity", _F),
    # features and observability
    ("enable-lora", _F),
    ("max-loras-per-batch", _V),
    ("lora-backend", _V),
    ("tool-call-parser", _V),
    ("reasoning-parser", _V),
    ("enable-custom-logit-processor", _F),
    ("enable-return-hidden-states", _F),
    ("preferred-sampling-params", _V),
    ("constrained-json-whitespace-pattern", _V),
    ("disable-outlines-disk-cache", _F),
    ("enable-multimodal", _F),
    ("enable-tokenizer-batch-encode", _F),
    ("tokenizer-worker-num", _V),
    ("weight-version", _V),
    ("enable-nan-detection", _F),
    ("enable-metrics", _F),
    ("enable-cache-report", _F),
    ("log-level-http", _V),
    ("log-requests", _F),
    ("show-time-cost", _F),
]

# Options Miles decides itself (as slime does), with the Miles flag to use instead.
_MANAGED: list[tuple[str, bool, str]] = [
    ("model-path", _V, "--hf-checkpoint"),
    ("trust-remote-code", _F, "--trust-remote-code"),
    ("dtype", _V, "--dtype"),
    ("config", _V, "--config (a Miles YAML file)"),
    ("port", _V, "placement (Miles picks the ports)"),
    ("nccl-port", _V, "placement (Miles picks the ports)"),
    ("dist-init-addr", _V, "placement (--rollout-num-gpus-per-engine)"),
    ("nnodes", _V, "placement (--rollout-num-gpus-per-engine)"),
    ("node-rank", _V, "placement (--rollout-num-gpus-per-engine)"),
    ("base-gpu-id", _V, "placement (--rollout-num-gpus, --colocate)"),
    ("gpu-id-step", _V, "placement (--rollout-num-gpus, --colocate)"),
    ("enable-memory-saver", _F, "--colocate / --offload-rollout"),
    ("skip-server-warmup", _F, "nothing: Miles always skips the warm-up"),
    ("enable-return-routed-experts", _F, "--use-rollout-routing-replay"),
]

SGLANG_OPTIONS: dict[str, SGLangOption] = {
    **{n: SGLangOption(n, v, "builtin") for n, v in _BUILTIN},
    **{n: SGLangOption(n, v, "passthrough") for n, v in _PASSTHROUGH},
    **{n: SGLangOption(n, v, "managed", m) for n, v, m in _MANAGED},
}
"""Every known SGLang server option, keyed by its CLI name without dashes in front."""


def options_with_status(status: Status) -> list[SGLangOption]:
    """The known options of one status, in table order."""
    return [o for o in SGLANG_OPTIONS.values() if o.status == status]


def find_option(key: str) -> SGLangOption | None:
    """The known option a flag or key names (``--sglang-page-size``, ``sglang_page_size``), if any."""
    name = key.lstrip("-").replace("_", "-")
    return SGLANG_OPTIONS.get(name[len("sglang-") :]) if name.startswith("sglang-") else None


def passthrough_text(option: SGLangOption, value: Any, where: str) -> str | None:
    """A config-file value as the string kept for the server; None for a switch set to false."""
    if isinstance(value, list | dict):
        raise ConfigError(f"{where}: key '{option.flag[2:]}' expects a single value, got {value!r}")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if option.takes_value:
        return text
    if text not in ("true", "false"):
        raise ConfigError(
            f"{where}: key '{option.flag[2:]}' is a switch and expects true or false, got {value!r}"
        )
    return "true" if text == "true" else None


def passthrough_problem(passthrough: Mapping[str, str], backend: str, external: bool) -> str | None:
    """Why these verbatim SGLang options cannot be used with this placement, or None."""
    for name in passthrough:
        option = SGLANG_OPTIONS[name]
        if option.status == "managed":
            return f"{option.flag} is set by Miles itself; use {option.miles_flag}"
        if backend == "miles":
            return (
                f"{option.flag} is an SGLang server option that the built-in engine does not implement; "
                "--rollout-backend sglang passes it to an external SGLang server"
            )
        if external:
            return (
                f"{option.flag} cannot reach the engines at --rollout-external-engine-addrs: "
                "they are already running with their own options"
            )
    return None

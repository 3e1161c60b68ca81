"""The ``miles`` command, and the only argv parsing in the project.

Each subcommand is a :class:`Subcommand` in :data:`COMMANDS`: a help line, a function that
adds its arguments, and a function that runs it. Adding one (``serve``, ``bench``, ``plot``)
is adding those two functions and a registry entry. Heavy modules (torch, transformers, the
model code, the RL loop, yaml) are imported inside the handlers, and only the chosen
subcommand's arguments are built, so ``miles --help`` answers at once.

Errors: a mistake of the user's (a flag, a file, a hook, a dataset row) prints
``miles: error: ...`` and exits 2; a run that cannot go on (:data:`RUN_ERRORS`) prints
``miles: error: ...`` and exits 1; both without a traceback, which ``miles --debug ...`` or
``MILES_DEBUG=1`` shows. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles import __version__
from miles.utils.dataclass_flags import ConfigError, Parser, unknown_argument_error
from miles.utils.suggest import closest, did_you_mean

Prompt = str | list[dict[str, Any]]


@dataclass(frozen=True)
class Subcommand:
    """One ``miles <name>``: its help line, its arguments, and its handler (returns the exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- train


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from miles.config import add_train_arguments

    add_train_arguments(parser)
    parser.usage = "miles train [--config FILE.yaml] [--dry-run] [FLAG ...]"
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, its files and hooks (no model is loaded), print it as YAML and exit",
    )


def _run_train(args: argparse.Namespace) -> int:
    from miles.config import config_from_namespace, config_to_yaml

    config = config_from_namespace(args)
    try:
        loop = importlib.import_module("miles.orchestrate.loop")
    except ImportError as e:
        # Only a missing loop means "not in this build"; a missing dependency inside it is a real error.
        if not (e.name or "").startswith("miles.orchestrate"):
            raise
        print("miles train: the RL loop is not available in this build", file=sys.stderr)
        return 2
    if args.dry_run:
        loop.preflight(config)  # files, hooks, unbuilt flags, the run directory: what a run checks first
        print(config_to_yaml(config), end="")
        return 0
    result = loop.run_train(config)
    return result if isinstance(result, int) else 0


# --------------------------------------------------------------------------- generate, chat, convert


def _model_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float) -> None:
    parser.add_argument("--hf-checkpoint", required=True, metavar="PATH", help="HF directory or .gguf file")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="(default: %(default)s)")
    parser.add_argument(
        "--temperature", type=float, default=temperature, help="0 = greedy (default: %(default)s)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=-1, help="-1 = off (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32")


def _check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k == 0 or args.top_k < -1:
        raise ConfigError(f"--top-k must be -1 (off) or >= 1, got {args.top_k}")


def _sampling_kwargs(args: argparse.Namespace, *, apply_chat_template: bool) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "apply_chat_template": apply_chat_template,
    }


def _load_generator(args: argparse.Namespace) -> Any:
    """The engine (``miles.LLM``) behind ``generate`` and ``chat``, loaded once."""
    from miles.engine.llm import LLM
    from miles.models.loading import CheckpointError

    try:
        llm = LLM(args.hf_checkpoint, dtype=args.dtype)
    except CheckpointError as e:
        raise ConfigError(f"--hf-checkpoint: {e}") from None
    return _EngineGenerator(llm)


class _EngineGenerator:
    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def generate(self, prompts: list[Any], *, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, seed: int | None, apply_chat_template: bool) -> list[str]:  # fmt: skip
        from miles.types import SamplingParams

        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            sampling_seed=seed,
        )
        outs = self.llm.generate(prompts, [params] * len(prompts), apply_chat_template=apply_chat_template)
        return [str(o["text"]) for o in outs]


def _is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def read_prompts(path: str, key: str) -> tuple[list[dict[str, Any]], list[Prompt]]:
    """The records of a prompts .jsonl file and the prompt of each (a string or chat messages).

    Blank lines are skipped. A bad line raises :class:`ConfigError` naming the file and line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--input {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"--input {path}: {e.strerror}") from None
    records: list[dict[str, Any]] = []
    prompts: list[Prompt] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        if key not in record:
            match = closest(key, list(record))
            hint = f" (did you mean --input-key {match}?)" if match else ""
            raise ConfigError(
                f"{path}:{lineno}: no key '{key}' in {list(record)}; choose one with --input-key{hint}"
            )
        if not _is_prompt(record[key]):
            raise ConfigError(
                f"{path}:{lineno}: '{key}' must be a string or a list of chat messages "
                '({"role": ..., "content": ...}), got ' + type(record[key]).__name__
            )
        records.append(record)
        prompts.append(record[key])
    if not prompts:
        raise ConfigError(f"{path}: no prompts in the file")
    return records, prompts


def write_outputs(path: str, records: list[dict[str, Any]], texts: list[str]) -> None:
    """Write each input record with its generated ``output`` as one JSON line."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for record, text in zip(records, texts, strict=True):
            fh.write(json.dumps({**record, "output": text}, ensure_ascii=False) + "\n")


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="FILE.jsonl", help="one JSON object per line")
    parser.add_argument("--input-key", default="prompt", help="key of the prompt: text or chat messages")
    parser.add_argument("--output", required=True, metavar="FILE.jsonl", help="input records + 'output'")
    parser.add_argument(
        "--apply-chat-template", action="store_true", help="wrap text prompts in the chat template"
    )
    _model_arguments(parser, max_new_tokens=128, temperature=0.0)


def _run_generate(args: argparse.Namespace) -> int:
    _check_sampling(args)
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ConfigError(f"--output {args.output} would overwrite --input")
    records, prompts = read_prompts(args.input, args.input_key)
    generator = _load_generator(args)
    texts = generator.generate(
        prompts, **_sampling_kwargs(args, apply_chat_template=args.apply_chat_template)
    )
    write_outputs(args.output, records, texts)
    print(f"wrote {len(texts)} outputs to {args.output}", file=sys.stderr)
    return 0


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--message", help="answer this one message and exit (default: read stdin)")
    parser.add_argument("--system", help="system prompt")
    _model_arguments(parser, max_new_tokens=256, temperature=0.7)


def _run_chat(args: argparse.Namespace) -> int:
    _check_sampling(args)
    generator = _load_generator(args)  # loaded once for every turn
    kwargs = _sampling_kwargs(args, apply_chat_template=True)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = list(start)

    def reply(message: str) -> str:
        history.append({"role": "user", "content": message})
        [text] = generator.generate([list(history)], **kwargs)
        history.append({"role": "assistant", "content": text})
        return text

    if args.message is not None:
        print(reply(args.message))
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("miles chat: type a message; /reset forgets the conversation, Ctrl-D or /exit quits.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.strip()
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            history[:] = start
        elif message:
            print(reply(message), flush=True)
    return 0


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hf-checkpoint", required=True, metavar="SRC", help="a .gguf file or an HF directory"
    )
    parser.add_argument("--to-hf", required=True, metavar="OUT", help="output HF directory (new or empty)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")


def _run_convert(args: argparse.Namespace) -> int:
    out = Path(args.to_hf)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--to-hf {out} exists and is not an empty directory")
    from miles.models.loading import CheckpointError, convert_to_hf

    try:
        convert_to_hf(args.hf_checkpoint, str(out), args.dtype)
    except CheckpointError as e:
        raise ConfigError(f"--hf-checkpoint: {e}") from None
    print(f"wrote {out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- serve


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-checkpoint", required=True, metavar="PATH", help="HF directory or .gguf file")
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address (default: %(default)s, loopback only)"
    )
    parser.add_argument("--port", type=int, default=30000, help="(default: %(default)s)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on all but /health and admin endpoints",
    )
    parser.add_argument(
        "--admin-api-key",
        default=None,
        metavar="KEY",
        help="the key of the admin endpoints (weights, memory, pause), from any host; without it they "
        "answer loopback clients only. Better given as $MILES_ADMIN_API_KEY (ps shows flags)",
    )
    # Removed (remote admin calls need the admin key); kept only to say so.
    parser.add_argument("--allow-remote-admin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=32 * 1024**2,
        help="largest request body (default: %(default)s; 413 beyond)",
    )
    parser.add_argument(
        "--max-weight-update-bytes",
        type=int,
        default=1024**3,
        help="largest weight update: /update_weights_from_tensor body, or one broadcast (default: %(default)s)",
    )
    parser.add_argument(
        "--max-requests-per-call",
        type=int,
        default=1024,
        help="engine requests one HTTP call may create: prompts x n (default: %(default)s)",
    )
    parser.add_argument(
        "--weight-update-group-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="rendezvous timeout of /init_weights_update_group (default: %(default)s)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="model id in the OpenAI API (default: the path)"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: CUDA when there is one)"
    )
    _engine_arguments(parser)


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's ``--sglang-*`` flags, generated from ``EngineConfig`` as ``miles train``'s are
    (``--log-level`` is ``--sglang-log-level``'s other name). The rollout client's settings and the
    SGLang options the built-in engine lacks are known but hidden, so that they are refused by name."""
    import dataclasses

    from miles.config import SPECS, EngineConfig, add_sglang_passthrough_arguments
    from miles.utils.dataclass_flags import add_flag

    group = parser.add_argument_group("engine: --sglang-* settings of the built-in engine (SGLang names)")
    client = EngineConfig.client_fields()
    for spec in SPECS.values():
        if spec.section != "engine" or not spec.cli:
            continue
        if spec.name == "log_level":
            spec = dataclasses.replace(spec, aliases=("--log-level",))
        add_flag(group, spec)
        if spec.name in client:
            parser._option_string_actions[spec.flag].help = argparse.SUPPRESS
    add_sglang_passthrough_arguments(parser)


def engine_config_of(args: argparse.Namespace) -> Any:
    """The ``EngineConfig`` of parsed ``miles serve`` arguments (defaults for the flags not given);
    ``ConfigError`` for a value out of bounds or an SGLang option the built-in engine lacks."""
    from miles.config import SPECS, EngineConfig, passthrough_options
    from miles.utils import sglang_options as sgl

    given = vars(args)
    options = passthrough_options(args)
    problem = sgl.passthrough_problem(options, "miles", external=False)
    if problem is not None:
        raise ConfigError(problem)
    return EngineConfig(
        **{s.name: given[key] for key, s in SPECS.items() if s.section == "engine" and key in given}
    )


def server_config_of(args: argparse.Namespace) -> Any:
    """The ``ServerConfig`` of parsed ``miles serve`` arguments, every value checked (``ConfigError``
    naming the flag) before anything loads. The admin key may come from ``$MILES_ADMIN_API_KEY``."""
    engine = engine_config_of(args)
    if args.port < 1:
        raise ConfigError(f"--port must be >= 1, got {args.port}")
    if args.allow_remote_admin:
        raise ConfigError(
            "--allow-remote-admin was removed: admin endpoints answer other hosts only with an admin key "
            "(--admin-api-key, or $MILES_ADMIN_API_KEY)"
        )
    from miles.engine.client import ADMIN_KEY_ENV

    admin_key = args.admin_api_key if args.admin_api_key is not None else os.environ.get(ADMIN_KEY_ENV)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    from miles.engine.server import ServerConfig

    try:
        return ServerConfig(
            model_path=args.hf_checkpoint,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            admin_api_key=admin_key,
            served_model_name=args.served_model_name,
            dtype=args.dtype,
            device=args.device,
            engine=engine,
            max_request_bytes=args.max_request_bytes,
            max_weight_update_bytes=args.max_weight_update_bytes,
            max_requests_per_call=args.max_requests_per_call,
            weight_update_group_timeout_s=args.weight_update_group_timeout,
        )
    except ValueError as e:  # ServerConfig's own checks, said with the flags' names
        flags = {
            "admin_api_key": f"--admin-api-key (or ${ADMIN_KEY_ENV})",
            "api_key": "--api-key",
            "weight_update_group_timeout_s": "--weight-update-group-timeout",
            **{n: "--" + n.replace("_", "-") for n in ("max_request_bytes", "max_weight_update_bytes",
                                                       "max_requests_per_call")},
        }  # fmt: skip
        message = str(e)
        for field, flag in flags.items():
            message = re.sub(rf"\b{field}\b", flag, message)
        raise ConfigError(message) from None


def _run_serve(args: argparse.Namespace) -> int:
    config = server_config_of(args)
    from miles.engine.server import serve
    from miles.models.loading import CheckpointError

    try:
        serve(config)
    except CheckpointError as e:
        raise ConfigError(f"--hf-checkpoint: {e}") from None
    return 0


# --------------------------------------------------------------------------- plot


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="a `miles train` run directory (has metrics.jsonl)"
    )
    parser.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/plots)")


def _run_plot(args: argparse.Namespace) -> int:
    from miles.utils.plot import plot_run

    try:
        written = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    for path in written:
        print(path)
    return 0


# --------------------------------------------------------------------------- registry and main

COMMANDS: dict[str, Subcommand] = {
    "train": Subcommand(
        "RL training: rollout -> reward -> train -> push weights", _train_arguments, _run_train
    ),
    "generate": Subcommand(
        "generate completions for a .jsonl file of prompts", _generate_arguments, _run_generate
    ),
    "serve": Subcommand(
        "serve a model over HTTP: SGLang's native API and the OpenAI API", _serve_arguments, _run_serve
    ),
    "chat": Subcommand("chat with a model (one message, or a REPL on stdin)", _chat_arguments, _run_chat),
    "convert": Subcommand(
        "convert a .gguf or HF checkpoint to an HF directory", _convert_arguments, _run_convert
    ),
    "plot": Subcommand(
        "draw a run's curves (reward, length, KL, entropy, ...) to PNG", _plot_arguments, _run_plot
    ),
}


def build_parser(
    command: str | None = None,
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``miles`` parser and its subparsers; only ``command``'s arguments are added."""
    parser = Parser(
        prog="miles", description="Miles: RL post-training for LLMs, MoE first.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"miles {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (also: MILES_DEBUG=1)"
    )
    subparsers = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    subs: dict[str, argparse.ArgumentParser] = {}
    for name, cmd in COMMANDS.items():
        subs[name] = subparsers.add_parser(
            name, help=cmd.help, description=cmd.help, allow_abbrev=False, prog=f"miles {name}"
        )
        if name == command:
            cmd.add_arguments(subs[name])
    return parser, subs


# Errors raised past the preflight checks, by class (``module.QualName``, matched along the MRO so
# that nothing is imported to recognise them) -> exit code. 2: the user's input (a dataset row, a
# hook); 1: a run that cannot go on (every sample failed, a checkpoint that fails its checksum).
RUN_ERRORS: dict[str, int] = {
    "miles.utils.dataclass_flags.ConfigError": 2,
    "miles.rollout.dataset.DatasetError": 2,
    "miles.rewards.registry.FunctionLoadError": 2,
    "miles.orchestrate.loop.LoopError": 1,
    "miles.rollout.manager.RolloutError": 1,
    "miles.models.loading.CheckpointError": 1,
}


def error_exit_code(error: BaseException) -> int | None:
    """The exit code :func:`main` gives ``error`` (see :data:`RUN_ERRORS`), or None for a bug."""
    for cls in type(error).__mro__:
        code = RUN_ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            return code
    return None


def debug_enabled(args_list: Sequence[str]) -> bool:
    """``miles --debug ...`` (before the command) or ``MILES_DEBUG`` set to anything but 0/false/empty."""
    command_at = next((i for i, a in enumerate(args_list) if not a.startswith("-")), len(args_list))
    env = os.environ.get("MILES_DEBUG", "").strip().lower()
    return "--debug" in args_list[:command_at] or env not in ("", "0", "false", "no")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``miles`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code.

    Usage, configuration and input errors print ``miles: error: ...`` and return 2; a run that
    cannot go on prints ``miles: error: ...`` and returns 1 (:data:`RUN_ERRORS`). With
    :func:`debug_enabled` they raise instead, with their traceback.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    try:
        if command is not None and command not in COMMANDS:
            raise ConfigError(
                f"unknown command '{command}'{did_you_mean(command, COMMANDS)} (commands: {', '.join(COMMANDS)})"
            )
        parser, subs = build_parser(command)
        args, extras = parser.parse_known_args(args_list)
        if "--debug" in extras:
            raise ConfigError(
                f"--debug goes before the command: miles --debug {args.command or 'COMMAND'} ..."
            )
        if extras:
            raise unknown_argument_error(extras, subs[args.command] if args.command else parser)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return COMMANDS[args.command].run(args)
    except SystemExit as e:  # --help and --version exit through argparse
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:
        code = error_exit_code(e)
        if code is None or debug_enabled(args_list):
            raise
        print(f"miles: error: {e}", file=sys.stderr)
        if code == 1:
            print(
                "miles: run it again with MILES_DEBUG=1 (or miles --debug ...) for the traceback",
                file=sys.stderr,
            )
        return code

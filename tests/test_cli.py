"""The ``miles`` command: subcommands, error paths, and that it starts without heavy imports."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from miles import __version__
from miles.cli import COMMANDS, main, read_prompts
from miles.config import ConfigError, parse_train_args

TRAIN = ["train", "--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rollout-batch-size", "4", "--num-rollout", "1", "--n-samples-per-prompt", "2",
         "--n-samples-per-prompt", "2", "--num-rollout", "3"]  # fmt: skip


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- startup


def test_importing_the_cli_loads_no_heavy_modules() -> None:
    code = (
        "import sys, miles.cli, miles.config; "
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'yaml') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_python_m_miles_help_lists_the_subcommands() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "miles", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    for name in ("train", "generate", "chat", "convert"):
        assert f"    {name} " in proc.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"], capsys)[:2] == (0, f"miles {__version__}\n")


def test_train_help_lists_the_flag_groups(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    for text in (
        "--rollout-batch-size",
        "--sglang-mem-fraction-static",
        "--lr ",
        "--config",
        "--dry-run",
        "engine:",
    ):
        assert text in out
    assert "--sglang-attention-backend V" not in out  # passthrough options are accepted, not advertised


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([], capsys)
    assert code == 2 and "commands:" in err


def test_unknown_command_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["trian", "--lr", "1"], capsys)
    assert code == 2
    assert (
        err
        == "miles: error: unknown command 'trian'; did you mean train? (commands: train, generate, serve, chat, convert, plot)\n"
    )


def test_registry_entries_are_complete() -> None:
    for name, cmd in COMMANDS.items():
        assert cmd.help and callable(cmd.add_arguments) and callable(cmd.run), name


# --------------------------------------------------------------------------- train


def _real_train(world: Path, run_dir: Path) -> list[str]:
    """``TRAIN`` with files that exist: the tiny model and prompts of ``arith_world``."""
    return ["train", "--hf-checkpoint", str(world / "model"), "--prompt-data", str(world / "train.jsonl"),
            "--input-key", "prompt", "--label-key", "label", "--rm-type", "exact", "--rollout-batch-size", "4",
            "--n-samples-per-prompt", "2", "--num-rollout", "3", "--run-dir", str(run_dir)]  # fmt: skip


def test_train_dry_run_prints_yaml_that_parses_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, arith_world: Path
) -> None:
    flags = [
        "--lr",
        "2e-6",
        "--sglang-page-size",
        "32",
        "--eval-prompt-data",
        "arith",
        str(arith_world / "eval.jsonl"),
    ]
    base = _real_train(arith_world, tmp_path / "run")
    code, out, _ = run([*base, *flags, "--dry-run"], capsys)
    assert code == 0
    assert "rollout_batch_size: 4" in out and "page_size: 32" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    path = tmp_path / "resolved.yaml"
    path.write_text(out)
    assert parse_train_args(["--config", str(path)]) == parse_train_args([*base[1:], *flags])


def test_train_config_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([*TRAIN, "--global-batch-size", "3", "--dry-run"], capsys)
    assert code == 2 and err.startswith("miles: error: --rollout-batch-size × --n-samples-per-prompt = 4 × 2")
    code, _, err = run([*TRAIN, "--rollout-batchsize", "3"], capsys)
    assert (code, err) == (
        2,
        "miles: error: unrecognized argument --rollout-batchsize; did you mean --rollout-batch-size?\n",
    )


def test_a_flag_prefix_suggests_the_flag_it_begins(capsys: pytest.CaptureFixture[str]) -> None:
    """A prefix wins over a closer-looking flag: --rollout-temp is --rollout-temperature's start,
    though difflib scores --rollout-stop higher."""
    from miles.utils.suggest import closest

    assert closest("--rollout-temp", ["--rollout-stop", "--rollout-temperature"]) == "--rollout-temperature"
    assert closest("--eval", ["--eval-top-k", "--eval-interval", "--val"]) == "--eval-top-k"  # the shortest
    assert closest("--lr-x", ["--lr", "--lr-warmup-iters"]) == "--lr"  # no prefix: the most similar
    code, _, err = run([*TRAIN, "--rollout-temp", "0.5"], capsys)
    assert (code, err) == (
        2,
        "miles: error: unrecognized argument --rollout-temp; did you mean --rollout-temperature?\n",
    )


def test_train_without_the_loop(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "miles.orchestrate.loop", None)  # makes the import fail as if absent
    code, _, err = run(TRAIN, capsys)
    assert (code, err) == (2, "miles train: the RL loop is not available in this build\n")


def test_train_calls_the_loop(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    fake = types.ModuleType("miles.orchestrate.loop")
    fake.run_train = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "miles.orchestrate.loop", fake)
    code, _, _ = run([*TRAIN, "--lr", "3e-6"], capsys)
    assert code == 0 and seen[0].train.lr == 3e-6 and seen[0].rollout.rollout_batch_size == 4


# --------------------------------------------------------------------------- generate / chat / convert


def test_generate_reads_writes_and_keeps_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], smollm2: str
) -> None:
    src = tmp_path / "in.jsonl"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    src.write_text(
        json.dumps({"prompt": "The capital of France is", "id": 1})
        + "\n\n"
        + json.dumps({"prompt": chat})
        + "\n"
    )
    out = tmp_path / "sub" / "out.jsonl"
    code, _, _ = run(["generate", "--hf-checkpoint", smollm2, "--input", str(src), "--output", str(out),
                      "--max-new-tokens", "8"], capsys)  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The capital of France is", chat] and rows[0]["id"] == 1
    assert "Paris" in rows[1]["output"]
    # Seeded sampling is reproducible through the command line.
    argv = ["generate", "--hf-checkpoint", smollm2, "--input", str(src), "--max-new-tokens", "6",
            "--temperature", "0.9", "--top-k", "20", "--seed", "7"]  # fmt: skip
    run([*argv, "--output", str(tmp_path / "a.jsonl")], capsys)
    run([*argv, "--output", str(tmp_path / "b.jsonl")], capsys)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_generate_custom_input_key(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"question": "q"}\n')
    prompts, rows = read_prompts(str(src), "question")
    assert rows == ["q"] and prompts == [{"question": "q"}]


BAD_JSONL = [
    ('{"prompt": "a"}\n{"prompt": \n', "in.jsonl:2: invalid JSON (Expecting value, column 12)"),
    ('["a"]\n', "in.jsonl:1: expected a JSON object, got list"),
    ('{"prompt": "a"}\n{"promt": "b"}\n', "in.jsonl:2: no key 'prompt' in ['promt']; choose one with --input-key "
                                          "(did you mean --input-key promt?)"),
    ('{"prompt": 3}\n', "in.jsonl:1: 'prompt' must be a string or a list of chat messages "
                        '({"role": ..., "content": ...}), got int'),
    ("\n\n", "in.jsonl: no prompts in the file"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_JSONL)
def test_read_prompts_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_prompts(str(path), "prompt")
    assert str(info.value) == f"{tmp_path}/{message}"


def test_generate_error_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n')
    out = str(tmp_path / "o.jsonl")
    base = ["generate", "--hf-checkpoint", "m", "--input", str(src), "--output", out]
    cases = [
        (["generate", "--input", str(src), "--output", out], "the following arguments are required: --hf-checkpoint"),
        (["generate", "--hf-checkpoint", "m", "--input", str(tmp_path / "no.jsonl"), "--output", out],
         f"--input {tmp_path / 'no.jsonl'}: no such file"),
        ([*base[:-1], str(src)], f"--output {src} would overwrite --input"),
        ([*base, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        ([*base, "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        ([*base, "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        ([*base, "--top-k", "0"], "--top-k must be -1 (off) or >= 1, got 0"),
        ([*base, "--max-new-token", "3"], "unrecognized argument --max-new-token; did you mean --max-new-tokens?"),
        (["generate", "--hf-checkpoint", "missing", "--input", str(src), "--output", out],
         "--hf-checkpoint: checkpoint not found: missing"),
    ]  # fmt: skip
    for argv, message in cases:
        code, _, err = run(argv, capsys)
        assert (code, err) == (2, f"miles: error: {message}\n"), argv


def test_chat_one_shot_and_repl(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smollm2: str
) -> None:
    base = ["chat", "--hf-checkpoint", smollm2, "--max-new-tokens", "6", "--temperature", "0"]
    code, hi, _ = run([*base, "--message", "hi"], capsys)
    assert code == 0 and hi.strip()
    _, fresh, _ = run([*base, "--message", "fresh"], capsys)
    # REPL: blank lines are ignored, history grows, /reset forgets it, EOF ends the session.
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nagain\n/reset\nfresh\n"))
    code, out, _ = run(base, capsys)
    assert code == 0 and out.startswith(hi) and out.endswith(fresh)


def test_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str], smollm2: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    code, _, _ = run(
        ["convert", "--hf-checkpoint", smollm2, "--to-hf", str(out), "--dtype", "bfloat16"], capsys
    )
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.bfloat16"
    assert AutoTokenizer.from_pretrained(out).chat_template
    code, _, err = run(["convert", "--hf-checkpoint", smollm2, "--to-hf", str(out)], capsys)
    assert code == 2 and err.endswith(f"miles: error: --to-hf {out} exists and is not an empty directory\n")
    code, _, err = run(
        ["convert", "--hf-checkpoint", smollm2, "--to-hf", str(tmp_path / "o"), "--dtype", "fp8"], capsys
    )
    assert code == 2 and "argument --dtype: invalid choice: 'fp8'" in err


def test_serve_cuda_graph_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad sizes are refused before anything loads; the engine process passes both flags on."""
    base = ["serve", "--hf-checkpoint", "m"]
    code, _, err = run([*base, "--sglang-cuda-graph-max-bs", "0"], capsys)
    assert (code, err) == (2, "miles: error: --sglang-cuda-graph-max-bs must be >= 1, got 0\n")

    from miles.config import parse_train_args
    from miles.orchestrate.engine_process import serve_arguments

    config = parse_train_args(
        ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rollout-batch-size", "4", "--num-rollout", "1", "--n-samples-per-prompt", "2",
         "--sglang-cuda-graph-max-bs", "64", "--sglang-disable-cuda-graph", "--sglang-disable-overlap-schedule"]
    )  # fmt: skip
    args = serve_arguments(config, "bfloat16", 4096)
    assert args[args.index("--sglang-cuda-graph-max-bs") + 1] == "64"
    assert "--sglang-disable-cuda-graph" in args and "--sglang-disable-overlap-schedule" in args
    assert config.engine.disable_overlap_schedule

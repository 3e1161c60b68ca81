"""The README's examples run as written, and the scripts tell a newcomer how to reach ``miles``."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from miles.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _command(prefix: str) -> list[str]:
    """The README's command line that starts with ``prefix``, split as the shell would."""
    [line] = [line for line in README.splitlines() if line.startswith(prefix)]
    return shlex.split(line.split("#", 1)[0])


def test_generate_example_reads_a_file_of_the_repository(
    smollm2: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = _command("miles generate ")[1:]
    src = ROOT / argv[argv.index("--input") + 1]
    assert src.is_file(), src
    # committed, not ignored: a fresh clone has it
    ignored = subprocess.run(["git", "check-ignore", "-q", str(src)], cwd=ROOT, check=False)
    assert ignored.returncode == 1, f"{src} is ignored by git"
    monkeypatch.chdir(ROOT)  # the example is run from the repository root
    out = tmp_path / "out.jsonl"
    argv[argv.index("--output") + 1] = str(out)
    assert main([*argv, "--max-new-tokens", "4"]) == 0, capsys.readouterr().err
    assert len(out.read_text().splitlines()) == len(src.read_text().splitlines())


def test_python_api_example_writes_a_checkpoint_transformers_loads_with_its_tokenizer(
    smollm2: str, tmp_path: Path
) -> None:
    [code] = re.findall(r"## Python API\n\n```python\n(.*?)```", README, flags=re.S)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out" / "smollm2-hf"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.encode("What is 2+3?")
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def test_save_hf_writes_a_given_tokenizer(arith_world: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from miles.models.loading import load_model, load_tokenizer, save_hf

    model = load_model(arith_world / "model")
    tokenizer = load_tokenizer(arith_world / "model")
    save_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode("1+2=") == tokenizer.encode("1+2=")
    with pytest.raises(ValueError, match="not both"):
        save_hf(model, tmp_path / "hf2", tokenizer=tokenizer, tokenizer_source=arith_world / "model")
    assert not (tmp_path / "hf2").exists()


def _installed() -> bool:
    """Whether scripts/setup.sh would find everything installed (so running it installs nothing)."""
    stamp = ROOT / ".venv" / ".miles-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return stamp.is_file() and stamp.read_text().strip() == want


@pytest.mark.skipif(not _installed(), reason="would install .venv (run scripts/setup.sh first)")
def test_scripts_say_how_to_put_miles_on_the_path() -> None:
    """The scripts run in a child shell: the venv they activate is gone when they end, so they
    end by saying how to activate it, unless the caller's shell already has it active."""
    hint = 'source scripts/setup.sh >/dev/null && miles_activate_hint && [ -x "$ROOT/.venv/bin/miles" ]'
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MILES_CALLER_VENV")}
    proc = subprocess.run(["bash", "-c", hint], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"source {ROOT}/.venv/bin/activate" in proc.stdout
    active = {**env, "VIRTUAL_ENV": str(ROOT / ".venv")}
    proc = subprocess.run(["bash", "-c", hint], cwd=ROOT, env=active, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    for script in ("quickstart.sh", "test.sh"):
        lines = (ROOT / "scripts" / script).read_text().strip().splitlines()
        assert lines[-1] == "miles_activate_hint", script

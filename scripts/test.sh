#!/usr/bin/env bash
# Set up .venv if needed, then run the same checks as CI: lint, format, types, tests.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`, `-k parity`).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
echo "[test] pre-commit (ruff lint, ruff format, mypy)"
pre-commit run --all-files --show-diff-on-failure
echo "[test] pytest"
python -m pytest -q "$@"
miles_activate_hint

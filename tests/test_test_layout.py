"""Shared test helpers live in ``conftest.py`` or a helper module, never in a ``test_*.py`` file.

Every file under ``tests/`` is read with ``ast``: an ``import`` of a ``tests.**.test_*`` module
(inside a function too: a lazy import is still an import; relative imports resolved), and a string
constant holding such an import (code handed to ``python -c`` in a subprocess), are reported.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# An import of a test module written in code passed as text (``python -c "from tests... import x"``).
_IN_TEXT = re.compile(r"\b(?:from\s+tests(?:\.\w+)*\.test_\w+\s+import|import\s+tests(?:\.\w+)*\.test_\w+)\b")


def _is_test_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "tests" and any(p.startswith("test_") for p in parts[1:])


def _package(path: Path) -> list[str]:
    """The dotted package of ``path``: ``tests/train/x.py`` -> ``["tests", "train"]``."""
    return ["tests", *path.parent.relative_to(TESTS).parts]


def _imported(path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        package = _package(path)
        base = package[: len(package) - (node.level - 1)]
        module = ".".join([*base, node.module] if node.module else base)
    else:
        module = node.module or ""
    if _is_test_module(module):
        return [module]
    # ``from tests.train import test_trainer`` imports a test module as well
    return [f"{module}.{a.name}" for a in node.names]


def _violations(path: Path) -> list[str]:
    rel = path.relative_to(TESTS.parent).as_posix()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            found += [
                f"{rel}:{node.lineno}: imports {m}" for m in _imported(path, node) if _is_test_module(m)
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [
                f"{rel}:{node.lineno}: imports in text: {m.group(0)!r}" for m in _IN_TEXT.finditer(node.value)
            ]
    return found


def _files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_file_imports_a_test_module():
    violations = [v for path in _files() for v in _violations(path)]
    assert not violations, (
        "shared test helpers belong in conftest.py or a helper module (tests/<pkg>/helpers.py), "
        "not in test_*.py files:\n" + "\n".join(violations)
    )


# The offending lines are assembled from pieces so that this file does not match itself.
_BAD = {
    "lazy": "def f():\n    from tests.pkg." + "test_mod import helper\n",
    "module": "import tests.pkg." + "test_mod\n",
    "from_package": "from tests.pkg import " + "test_mod\n",
    "relative": "from ." + "test_mod import helper\n",
    "subprocess": 'code = "from tests.pkg.' + 'test_mod import helper; helper()"\n',
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_checker_catches_a_violation(tmp_path, monkeypatch, case):
    """The layout check itself can fail: each way of importing a test module is reported."""
    fake = tmp_path / "tests"
    (fake / "pkg").mkdir(parents=True)
    (fake / "pkg" / "helpers.py").write_text("def helper():\n    pass\n")
    (fake / "pkg" / "test_user.py").write_text(_BAD[case])
    monkeypatch.setattr(sys.modules[__name__], "TESTS", fake)
    with pytest.raises(AssertionError, match=r"tests/pkg/test_user\.py:\d+: imports"):
        test_no_file_imports_a_test_module()


def test_checker_allows_helper_modules(tmp_path, monkeypatch):
    fake = tmp_path / "tests"
    (fake / "pkg").mkdir(parents=True)
    (fake / "pkg" / "test_user.py").write_text(
        "from tests.pkg.helpers import helper\nfrom tests.pkg.conftest import CASES\nfrom .helpers import x\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "TESTS", fake)
    test_no_file_imports_a_test_module()

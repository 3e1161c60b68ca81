"""The dependency arrows of DESIGN.md §1, and the one-place rule for Ray, FastAPI and Triton.

Every ``import miles.X`` inside ``miles/`` is read with ``ast`` (imports inside functions too:
a lazy import is still a dependency) and checked against ``ALLOWED``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "miles"

# subsystem -> subsystems it may import (itself always allowed). Subsystem = first component
# under miles/ ("models", "types", "config", ...); "engine.client" is the one engine module
# the rollout side may use.
_BASE = {"utils", "types"}
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "types": {"utils"},
    "kernels": {"utils"},
    "algo": _BASE,
    "models": _BASE | {"kernels"},
    "rewards": _BASE,
    "buffer": _BASE,  # groups -> TrainBatch only: advantages are the trainer's step (train -> algo)
    "config": _BASE,
    "train": _BASE | {"models", "kernels", "algo", "config"},
    "engine": _BASE | {"models", "kernels", "config"},
    "rollout": _BASE | {"engine.client", "rewards", "buffer", "config"},
    "orchestrate": {"*"},
    "cli": {"*"},  # the edge: parses argv, then imports what the subcommand needs, lazily
    "__main__": {"cli"},
    "__init__": set(),
}
# Third-party libraries that may be imported in one place only.
ONE_PLACE = {
    "ray": {"orchestrate/ray.py"},
    # The HTTP server: the app's assembly and its routes by concept (docs/architecture.md).
    "fastapi": {
        "engine/server.py",
        "engine/routes_native.py",
        "engine/routes_openai.py",
        "engine/routes_admin.py",
    },
    "uvicorn": {"engine/server.py"},
    "triton": {"kernels/triton"},  # a module or a package of that name
}


# Top-level modules that belong to another subsystem: the configuration's cross-field rules read
# its typed sections (miles.config runs them), so the two are one subsystem, not a two-way arrow.
PART_OF = {"config_rules": "config"}


def _subsystem(path: Path) -> str:
    rel = path.relative_to(PKG)
    name = rel.parts[0].removesuffix(".py")
    return PART_OF.get(name, name)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: use absolute imports (from miles...)")
            if node.module:
                found.append((node.lineno, node.module))
                # `from miles import models` imports a subsystem too
                if node.module == "miles":
                    found += [(node.lineno, f"miles.{a.name}") for a in node.names]
    return found


def _target(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "miles" or len(parts) == 1:
        return None
    if parts[1] == "engine" and len(parts) > 2 and parts[2] == "client":
        return "engine.client"
    return PART_OF.get(parts[1], parts[1])


def _files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_dependency_arrows():
    violations = []
    for path in _files():
        src = _subsystem(path)
        if src not in ALLOWED:
            violations.append(
                f"{path.relative_to(PKG)}: subsystem {src!r} is not in the layout (add it to ALLOWED)"
            )
            continue
        allowed = ALLOWED[src]
        for line, module in _imports(path):
            tgt = _target(module)
            if tgt is None or tgt == src or (src == "engine" and tgt == "engine.client"):
                continue
            if "*" in allowed or tgt in allowed or (tgt == "engine.client" and "engine" in allowed):
                continue
            violations.append(f"{path.relative_to(PKG)}:{line}: {src} may not import {module}")
    assert not violations, "\n".join(violations)


def test_nothing_imports_orchestrate():
    offenders = [
        f"{p.relative_to(PKG)}:{line}"
        for p in _files()
        if _subsystem(p) not in ("orchestrate", "cli")
        for line, module in _imports(p)
        if _target(module) == "orchestrate"
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("library", sorted(ONE_PLACE))
def test_heavy_libraries_live_in_one_place(library):
    places = ONE_PLACE[library]
    offenders = []
    for path in _files():
        rel = path.relative_to(PKG).as_posix()
        if any(rel == p or rel.startswith(p.removesuffix(".py") + "/") or rel == p + ".py" for p in places):
            continue
        if any(m.split(".")[0] == library for _, m in _imports(path)):
            offenders.append(rel)
    assert not offenders, f"{library} imported outside {sorted(places)}: {offenders}"


def test_checker_catches_a_violation(tmp_path, monkeypatch):
    """The arrow check itself can fail: a models file importing train is reported."""
    fake = tmp_path / "miles"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text("def f():\n    from miles.train import trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    with pytest.raises(AssertionError, match="models may not import miles.train"):
        test_dependency_arrows()


def test_light_modules_do_not_import_torch():
    code = (
        "import sys, miles, miles.types\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'ray') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

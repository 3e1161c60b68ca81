"""Built-in names and load_function errors."""

from __future__ import annotations

import sys

import pytest

from miles.rewards import BUILTIN_REWARDS, FunctionLoadError, get_reward_function, load_function


@pytest.mark.parametrize("name", sorted(BUILTIN_REWARDS))
def test_builtins_load(name):
    assert callable(get_reward_function(name))


def test_unknown_builtin():
    with pytest.raises(ValueError, match=r"unknown rm_type 'countdwn'; did you mean countdown\?"):
        get_reward_function("countdwn")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    pkg = tmp_path / "myplugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rm.py").write_text(
        "async def score(args, sample):\n    return 1.0\n"
        "def sync_score(args, sample):\n    return 0.0\n"
        "class Judge:\n    @staticmethod\n    async def run(args, sample):\n        return 2.0\n"
        "THRESHOLD = 3\n"
    )
    (pkg / "broken.py").write_text("import not_a_real_dependency_xyz\n")
    (pkg / "raises.py").write_text("raise RuntimeError('bad config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myplugins"
    for m in [m for m in sys.modules if m.startswith("myplugins")]:
        del sys.modules[m]


def test_load_function_forms(plugin):
    assert load_function("myplugins.rm.score").__name__ == "score"
    assert load_function("myplugins.rm:sync_score").__name__ == "sync_score"
    assert load_function("myplugins.rm.Judge.run", require_async=True).__name__ == "run"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("nopkg_xyz.mod.fn", "no module named 'nopkg_xyz'"),
        ("myplugins.nomod.fn", "no module named 'myplugins.nomod'"),
        ("myplugins.rm.scor", "'myplugins.rm' has no attribute 'scor'; did you mean score?"),
        ("myplugins.rm.THRESHOLD", "is a int, not a function"),
        (
            "myplugins.broken.fn",
            "importing 'myplugins.broken' failed: No module named 'not_a_real_dependency_xyz'",
        ),
        ("myplugins.raises.fn", "importing 'myplugins.raises' raised RuntimeError: bad config"),
        ("fn", "must be 'package.module.function'"),
        (".rm.fn", "must be 'package.module.function'"),
    ],
)
def test_load_function_errors(plugin, path, message):
    with pytest.raises(FunctionLoadError) as e:
        load_function(path)
    assert message in str(e.value)


def test_require_async(plugin):
    with pytest.raises(FunctionLoadError, match="must be 'async def'"):
        load_function("myplugins.rm.sync_score", require_async=True, what="reward function")

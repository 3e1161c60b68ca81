"""Built-in names and load_function errors."""

from __future__ import annotations

import asyncio
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


@pytest.fixture
def in_dir(tmp_path, monkeypatch):
    """``tmp_path`` as the current directory, with sys.path and sys.modules restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_hook_in_the_current_directory_is_found_without_pythonpath(in_dir):
    """Regression: 'no module named my_reward' unless PYTHONPATH=. was set."""
    (in_dir / "cwd_reward_xyz.py").write_text(
        "async def score(args, sample):\n    import cwd_helper_xyz\n    return cwd_helper_xyz.VALUE\n"
    )
    (in_dir / "cwd_helper_xyz.py").write_text("VALUE = 0.25\n")  # imported lazily, at call time
    (in_dir / "cwd_pkg_xyz").mkdir()
    (in_dir / "cwd_pkg_xyz" / "rm.py").write_text("def score(args, sample):\n    return 1.0\n")
    fn = load_function("cwd_reward_xyz.score", require_async=True, what="reward function")
    assert asyncio.run(fn(None, None)) == 0.25
    assert load_function("cwd_pkg_xyz.rm:score")(None, None) == 1.0  # a folder without __init__.py
    assert sys.path.count(str(in_dir)) == 1  # added once, not per hook


def test_current_directory_is_added_only_when_it_holds_the_hook(in_dir):
    path_before = list(sys.path)
    assert load_function("miles.rewards.simple.rm_exact").__name__ == "rm_exact"
    with pytest.raises(FunctionLoadError) as e:
        load_function("absent_mod_xyz.fn", what="reward function")
    assert sys.path == path_before
    assert str(e.value) == (
        f"cannot load reward function 'absent_mod_xyz.fn': no module named 'absent_mod_xyz' "
        f"(looked in the current directory {in_dir} and on sys.path)"
    )


def test_errors_of_a_hook_in_the_current_directory_stay_precise(in_dir):
    (in_dir / "cwd_rm_xyz.py").write_text("async def score(args, sample):\n    return 1.0\n")
    with pytest.raises(FunctionLoadError, match="'cwd_rm_xyz' has no attribute 'scor'; did you mean score?"):
        load_function("cwd_rm_xyz.scor")

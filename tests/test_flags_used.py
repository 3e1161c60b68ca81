"""Every flag ``miles train`` accepts is used or refused, and the config rules are type-checked.

"Used" is found by mypy itself: the whole ``miles`` package is type-checked (third-party imports
skipped, which takes seconds) with a plugin that records every typed read of a config section's
attribute or method, and where it happens. Reads inside the configuration's own machinery
(``MACHINERY``: the dataclasses, the rules, the flag generator) do not count, nor does
``loop.hook_args``, which hands every setting to slime-style hooks through ``vars()``; a section
property or method counts for the fields it reads when code outside reads it; a built-in hook
counts for the setting it reads by name (``getattr(args, "rm_url")``).

A flag no code reads must be one of: ``DERIVED`` (it only sets other settings, which are read),
``RESTATES`` (every value it accepts restates what other flags already do, and it is refused
where it would mean more), or ``REFUSED`` (every value but the default is refused with a message
naming it, by ``miles/config_rules.py``). A new flag that nothing reads fails
:func:`test_every_flag_is_read_or_resolved` until it is given a reader or a refusal.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mypy import build
from mypy.modulefinder import BuildSource
from mypy.options import Options
from mypy.plugin import AttributeContext, MethodContext, Plugin

from miles.cli import build_parser
from miles.config import _SECTION_TYPES, SPECS, ConfigError, MilesConfig, parse_train_args
from miles.utils.dataclass_flags import FieldSpec, check_bounds

REPO = Path(__file__).resolve().parents[1]
MACHINERY = {
    "miles.config",
    "miles.config_rules",
    "miles.utils.dataclass_flags",
    "miles.utils.sglang_options",
}
SECTIONS = {"": MilesConfig, **_SECTION_TYPES}
CLASSES = {f"miles.config.{cls.__name__}": cls for cls in SECTIONS.values()}
PASS_DEST = "sglang_passthrough:"
BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rollout-batch-size", "4",
        "--n-samples-per-prompt", "2", "--num-rollout", "3"]  # fmt: skip

# The rules, with one field read misspelled: type-checked beside the real package, it must fail.
MISSPELT = ("c.rollout.rollout_batch_size", "c.rollout.rollout_batch_sise")

# Flags no code reads that only set other settings: flag -> (argv, settings it gives that are read).
DERIVED: dict[str, tuple[list[str], dict[str, Any]]] = {
    "global_batch_size": (["--global-batch-size", "2"], {"num_steps_per_rollout": 4}),
    "offload": (["--offload"], {"offload_train": True, "offload_rollout": True}),
}
# Flags whose accepted values restate other flags: flag -> (why, argv refused, context, argv accepted
# in that context, which then changes no other setting).
RESTATES: dict[str, tuple[str, list[str], list[str], list[str]]] = {
    "train_backend": ("FSDP2 is the only backend", ["--train-backend", "megatron"], [], ["--train-backend", "fsdp"]),
    "sglang_tp_size": ("--rollout-num-gpus-per-engine sets it", ["--sglang-tp-size", "2"], [],
                       ["--sglang-tp-size", "1"]),
    "debug_train_only": ("--load-debug-rollout-data trains on saved rollouts without generating",
                         ["--debug-train-only"], ["--load-debug-rollout-data", "d"], ["--debug-train-only"]),
    "rollout_backend": ("sglang: the external engines are SGLang servers (true on-policy is refused)",
                        ["--rollout-backend", "sglang"], ["--rollout-external-engine-addrs", "h:1"],
                        ["--rollout-backend", "sglang"]),
}  # fmt: skip
# Flags refused at every value but the default (miles/config_rules.py: refuse_unbuilt, or a rule
# whose condition is itself refused); the value tells how the message names it, when not by its flag.
REFUSED: dict[str, str | None] = {
    "trust_remote_code": None,
    "balance_data": None,
    "log_probs_max_tokens_per_gpu": None,
    "disable_rewards_normalization": None,
    "use_unbiased_kl": None,
    "rollout_max_context_len": None,
    "sglang_chunked_prefill_size": None,
    "sglang_speculative_algorithm": None,
    "sglang_speculative_draft_model_path": "--sglang-speculative-*",  # needs the algorithm, refused
    "sglang_speculative_num_steps": "--sglang-speculative-*",
    "sglang_speculative_eagle_topk": "--sglang-speculative-*",
    "sglang_speculative_num_draft_tokens": "--sglang-speculative-*",
    "sglang_dp_size": None,  # must divide the engine's tensor-parallel size, which is 1
    "sglang_ep_size": None,
    "sglang_router_ip": None,
    "sglang_router_port": None,
    "no_save_optim": None,
    "log_level": None,
    "rollout_num_gpus_per_engine": None,  # an engine runs on one device
}
# Parser options that are not settings: argparse's help, the config file, cli's --dry-run.
NOT_SETTINGS = {"help", "config", "dry_run"}


# --------------------------------------------------------------------------- who reads what


class _ReadRecorder(Plugin):
    """Records (class, member, module, line) for every typed read of a config class's member."""

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.reads: set[tuple[str, str, str, int]] = set()

    def _record(self, fullname: str, api: Any, line: int) -> None:
        cls, _, member = fullname.rpartition(".")
        if cls in CLASSES:
            self.reads.add((cls.rpartition(".")[2], member, api.tree.fullname, line))

    def get_attribute_hook(self, fullname: str) -> Any:
        def hook(ctx: AttributeContext) -> Any:
            self._record(fullname, ctx.api, ctx.context.line)
            return ctx.default_attr_type

        return hook if fullname.startswith("miles.config.") else None

    def get_method_hook(self, fullname: str) -> Any:
        def hook(ctx: MethodContext) -> Any:
            self._record(fullname, ctx.api, ctx.context.line)
            return ctx.default_return_type

        return hook if fullname.startswith("miles.config.") else None


@dataclasses.dataclass(frozen=True)
class TypeCheck:
    reads: frozenset[tuple[str, str, str, int]]  # (class, member, module, line)
    errors: tuple[str, ...]


def _sources() -> Iterator[BuildSource]:
    for path in sorted((REPO / "miles").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        yield BuildSource(str(path), ".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    rules = (REPO / "miles" / "config_rules.py").read_text()
    assert MISSPELT[0] in rules
    yield BuildSource(
        "miles/config_rules_misspelt.py", "miles.config_rules_misspelt", rules.replace(*MISSPELT, 1)
    )


@pytest.fixture(scope="module")
def checked() -> TypeCheck:
    options = Options()
    options.python_version = (3, 11)
    options.follow_imports = "skip"  # third-party modules are Any: only miles' own types matter here
    options.ignore_missing_imports = True
    options.check_untyped_defs = True
    options.incremental = False
    options.cache_dir = os.devnull
    recorder = _ReadRecorder(options)
    result = build.build(list(_sources()), options, extra_plugins=[recorder])
    return TypeCheck(frozenset(recorder.reads), tuple(result.errors))


def _members_reading_self() -> dict[tuple[str, str], set[str]]:
    """(class, property or method) -> the attributes of ``self`` its body reads, in miles/config.py."""
    tree = ast.parse((REPO / "miles" / "config.py").read_text())
    out: dict[tuple[str, str], set[str]] = {}
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef):
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef):
                    out[(cls.name, fn.name)] = {
                        n.attr
                        for n in ast.walk(fn)
                        if isinstance(n, ast.Attribute)
                        and isinstance(n.value, ast.Name)
                        and n.value.id == "self"
                    }
    return out


def _hook_reads() -> set[str]:
    """Settings a built-in slime-style hook reads by name: ``getattr(args, "rm_url", ...)``."""
    names: set[str] = set()
    for path in (REPO / "miles").rglob("*.py"):
        if path.name in ("cli.py", "config.py", "config_rules.py"):
            continue  # cli's ``args`` are other subcommands' namespaces
        for n in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Name)
                and n.func.id == "getattr"
                and len(n.args) >= 2
                and isinstance(n.args[0], ast.Name)
                and n.args[0].id == "args"
                and isinstance(n.args[1], ast.Constant)
                and isinstance(n.args[1].value, str)
            ):
                names.add(n.args[1].value)
    return names


def read_settings(check: TypeCheck) -> dict[str, set[str]]:
    """Flat key -> where it is read ("module:line"), outside the configuration's machinery."""
    where: dict[tuple[str, str], set[str]] = {}
    for cls, member, module, line in check.reads:
        if module not in MACHINERY and not module.startswith("miles.config_rules"):
            where.setdefault((cls, member), set()).add(f"{module}:{line}")
    bodies = _members_reading_self()
    todo = [key for key in where if key in bodies]
    while todo:  # a property read outside counts for the fields it reads, transitively
        cls, member = todo.pop()
        for attr in bodies[(cls, member)]:
            if (cls, attr) not in where:
                where[(cls, attr)] = set()
                todo += [(cls, attr)] if (cls, attr) in bodies else []
            where[(cls, attr)].add(f"via {cls}.{member}")
    hooks = _hook_reads()
    out: dict[str, set[str]] = {}
    for key, spec in SPECS.items():
        places = set(where.get((SECTIONS[spec.section].__name__, spec.name), set()))
        if spec.section == "rollout" and key in hooks:
            places.add(f'a built-in hook: getattr(args, "{key}")')
        if places:
            out[key] = places
    return out


def train_options() -> list[Any]:
    """The options of the real ``miles train`` parser."""
    _, subs = build_parser("train")
    return list(subs["train"]._actions)


# --------------------------------------------------------------------------- the tests


def test_every_flag_is_read_or_resolved(checked: TypeCheck) -> None:
    read = read_settings(checked)
    dests = {a.dest for a in train_options()}
    assert dests - set(SPECS) - NOT_SETTINGS == {d for d in dests if d.startswith(PASS_DEST)}
    flags = {k for k, s in SPECS.items() if s.cli}
    assert flags <= dests
    unread = flags - set(read)
    resolved = set(DERIVED) | set(RESTATES) | set(REFUSED)
    assert not unread - resolved, (
        f"read nowhere, and neither derived nor refused: {sorted(unread - resolved)}; give each a reader, or a "
        "refusal in miles/config_rules.py (refuse_unbuilt) listed in REFUSED"
    )
    assert not resolved - unread, {k: sorted(read[k]) for k in resolved - unread if k in read}


@pytest.mark.parametrize("key", sorted(DERIVED))
def test_derived_flags_set_read_settings(checked: TypeCheck, key: str) -> None:
    argv, expected = DERIVED[key]
    read = read_settings(checked)
    base, given = _flat(parse_train_args(BASE)), _flat(parse_train_args([*BASE, *argv]))
    for target, value in expected.items():
        assert target in read, f"{target} (set by --{key}) is read nowhere"
        assert (base[target], given[target]) != (value, value) and given[target] == value


@pytest.mark.parametrize("key", sorted(RESTATES))
def test_restating_flags_change_nothing_else_and_are_refused_otherwise(key: str) -> None:
    _, refused, context, accepted = RESTATES[key]
    with pytest.raises(ConfigError, match=SPECS[key].flag):
        parse_train_args([*BASE, *refused])
    without, given = (
        _flat(parse_train_args([*BASE, *context])),
        _flat(parse_train_args([*BASE, *context, *accepted])),
    )
    assert {k: v for k, v in given.items() if k != key} == {k: v for k, v in without.items() if k != key}


def _values_besides_default(spec: FieldSpec) -> list[Any]:
    """Values of every kind the field takes, within its bounds, other than the default."""
    if spec.choices:
        candidates: list[Any] = list(spec.choices)
    elif spec.kind == "bool":
        candidates = [True, False]
    elif spec.kind == "int":
        candidates = [-1, 0, 1, 2, 3, 1000]
    elif spec.kind == "float":
        candidates = [0.5, 1.0, 1.5, 1000.0]
    elif spec.kind == "tuple":
        candidates = [(1,) if spec.elem == "int" else ("x",)]
    elif spec.kind == "mapping":
        candidates = [{"a": "1"}]
    else:
        candidates = ["x"]
    return [v for v in candidates if v != spec.default and check_bounds(spec, v) is None]


def _argv(spec: FieldSpec, value: Any) -> list[str]:
    if spec.kind == "bool":
        return [spec.flag if value else "--no-" + spec.flag[2:]]
    if spec.kind == "tuple":
        return [spec.flag, *map(str, value)]
    return [spec.flag, json.dumps(value) if spec.kind == "mapping" else str(value)]


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_refused_flags_are_refused_at_every_other_value(key: str) -> None:
    spec = SPECS[key]
    values = _values_besides_default(spec)
    assert values
    for value in values:
        argv = _argv(spec, value)
        with pytest.raises(ConfigError) as info:
            parse_train_args([*BASE, *argv])
        assert (REFUSED[key] or argv[0]) in str(info.value), (argv, str(info.value))


@pytest.mark.parametrize(
    "context",
    [
        [],
        ["--rollout-backend", "sglang"],
        ["--rollout-backend", "sglang", "--rollout-external-engine-addrs", "h:1"],
    ],
    ids=["miles", "sglang", "sglang-external"],
)
def test_every_verbatim_sglang_option_is_refused(context: list[str]) -> None:
    """Verbatim SGLang options reach no engine: the built-in engine lacks them, Miles does not launch
    SGLang servers, and running ones keep their own options."""
    options = [a for a in train_options() if a.dest.startswith(PASS_DEST)]
    assert len(options) > 40
    for action in options:
        flag = action.option_strings[0]
        argv = [flag, "1"] if action.nargs is None and action.const is None else [flag]
        with pytest.raises(ConfigError) as info:
            parse_train_args([*BASE, *context, *argv])
        assert flag in str(info.value) or "--rollout-backend sglang without" in str(info.value), str(
            info.value
        )


def test_an_unread_flag_fails(checked: TypeCheck) -> None:
    """The check is not vacuous: a setting nothing reads is reported, and one that is read is not."""
    read = read_settings(checked)
    assert {
        "lr",
        "rollout_batch_size",
        "use_kl_loss",
        "sglang_page_size",
        "rm_url",
        "eval_prompt_data",
    } <= set(read)
    assert "trust_remote_code" not in read and "balance_data" not in read
    assert all(where.split(":")[0] != "miles.config" for places in read.values() for where in places)


# --------------------------------------------------------------------------- the rules are typed


def test_every_setting_the_rules_read_is_type_checked(checked: TypeCheck) -> None:
    """Each read of a config field in miles/config_rules.py goes through a typed section (not Any)."""
    names = {s.name for s in SPECS.values()} | {f.name for f in dataclasses.fields(MilesConfig)}
    tree = ast.parse((REPO / "miles" / "config_rules.py").read_text())
    in_source = {
        (n.attr, n.lineno) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in names
    }
    typed = {(member, line) for _, member, module, line in checked.reads if module == "miles.config_rules"}
    assert len(in_source) > 100
    assert in_source <= typed, sorted(in_source - typed)


def test_a_misspelt_field_in_a_rule_fails_mypy(checked: TypeCheck) -> None:
    errors = [e for e in checked.errors if e.startswith("miles/config_rules_misspelt.py")]
    assert any('has no attribute "rollout_batch_sise"' in e and "[attr-defined]" in e for e in errors), errors


def _flat(config: MilesConfig) -> dict[str, Any]:
    return {k: getattr(getattr(config, s.section) if s.section else config, s.name) for k, s in SPECS.items()}

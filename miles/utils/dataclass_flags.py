"""Command-line flags and YAML keys generated from typed, frozen dataclasses.

The dataclass fields are the single source of truth: their names give the flag and key names,
their annotations the types, their defaults the defaults, and ``metadata`` the help text and
value bounds. ``miles.config`` declares the fields; this module turns them into argparse options,
checks YAML values against them, and writes a config back out as plain data.

Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]`` (choices),
``X | None``, ``tuple[X, ...]`` (``nargs="+"``) and ``Mapping[str, X]`` (a JSON object on the
command line, a mapping in YAML). Field metadata keys: ``help``; ``ge``/``gt``/``le``/``lt``
(numeric bounds); ``cli`` (False: YAML only, no flag); ``slime`` (a note on the slime default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A bad command line or config file; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class FieldSpec:
    """One configurable field: where it lives, its flat key and flag, its type and bounds."""

    key: str  # flat key, unique over the whole tree: "rollout_batch_size", "sglang_page_size"
    section: str  # attribute of the root config holding it ("" for a field of the root)
    name: str  # field name inside the section's dataclass
    kind: str  # bool | int | float | str | tuple | mapping
    elem: str  # element kind of a tuple or mapping value, else ""
    choices: tuple[Any, ...] | None
    optional: bool
    default: Any
    help: str
    bounds: tuple[tuple[str, float], ...]  # (("gt", 0.0), ("le", 1.0))
    cli: bool
    aliases: tuple[str, ...] = ()  # other spellings of the flag (``--moe-aux-loss-coef``)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


_SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}


def _analyze(tp: Any) -> tuple[str, str, tuple[Any, ...] | None, bool]:
    """(kind, element kind, choices, optional) of a field annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union annotation {tp!r}")
        optional, tp, origin = True, args[0], typing.get_origin(args[0])
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return _SCALARS[type(choices[0])], "", choices, optional
    if origin is tuple:
        return "tuple", _SCALARS[typing.get_args(tp)[0]], None, optional
    if origin in (Mapping, dict):
        value_tp = typing.get_args(tp)[1]
        return "mapping", _SCALARS.get(value_tp, "any"), None, optional
    return _SCALARS[tp], "", None, optional


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name} needs a default")


def _spec(section: str, prefix: str, f: dataclasses.Field[Any], tp: Any) -> FieldSpec:
    kind, elem, choices, optional = _analyze(tp)
    meta = f.metadata
    bounds = tuple((b, float(meta[b])) for b in ("ge", "gt", "le", "lt") if b in meta)
    help_text = meta.get("help", "")
    if "slime" in meta:
        help_text += f" [slime: {meta['slime']}]"
    return FieldSpec(
        key=f.name if f.name.startswith(prefix) else prefix + f.name,
        section=section,
        name=f.name,
        kind=kind,
        elem=elem,
        choices=choices,
        optional=optional,
        default=_default_of(f),
        help=help_text,
        bounds=bounds,
        cli=meta.get("cli", True),
        aliases=tuple(meta.get("aliases", ())),
    )


def collect_specs(root: type) -> dict[str, FieldSpec]:
    """Flat key -> spec for every field of ``root`` and of its dataclass-typed fields (sections).

    A section class may set ``FLAG_PREFIX`` (e.g. ``"sglang_"``) to prefix its keys and flags.
    """
    specs: dict[str, FieldSpec] = {}
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            prefix = getattr(tp, "FLAG_PREFIX", "")
            sub_hints = typing.get_type_hints(tp)
            new = [_spec(f.name, prefix, sf, sub_hints[sf.name]) for sf in dataclasses.fields(tp)]
        else:
            new = [_spec("", "", f, tp)]
        for s in new:
            if s.key in specs:
                raise TypeError(f"config key {s.key!r} is defined twice")
            specs[s.key] = s
    return specs


def parse_json_object(text: str) -> dict[str, Any]:
    """argparse ``type=`` for a JSON object flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


class BooleanFlag(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag``, where the first one given at registration means True.

    ``argparse.BooleanOptionalAction`` decides by the prefix of the option used, so a flag named
    ``--no-save-optim`` (slime's) could only ever be set to False."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: Any = None,
    ) -> None:
        if option_string in self.option_strings:
            setattr(namespace, self.dest, option_string == self.option_strings[0])


def add_flag(group: argparse._ActionsContainer, spec: FieldSpec) -> None:
    """Register ``spec`` as an option whose default is SUPPRESS, so that the namespace holds
    only the flags actually given: that is what lets flags override a config file."""
    kwargs: dict[str, Any] = {"dest": spec.key, "default": argparse.SUPPRESS, "help": spec.help}
    shown = json.dumps(dict(spec.default)) if isinstance(spec.default, Mapping) else spec.default
    if not (shown is None or shown is False or shown in ((), "{}")) and "default:" not in spec.help:
        kwargs["help"] += f" (default: {shown})"
    kwargs["help"] = kwargs["help"].replace("%", "%%")
    if spec.kind == "bool":
        kwargs["action"] = BooleanFlag
    elif spec.kind == "tuple":
        kwargs.update(nargs="+", type={"int": int, "float": float}.get(spec.elem, str), metavar="X")
    elif spec.kind == "mapping":
        kwargs.update(type=parse_json_object, metavar="JSON")
    else:
        kwargs["type"] = {"int": int, "float": float, "str": str}[spec.kind]
        if spec.choices:
            kwargs["choices"] = spec.choices
        else:
            kwargs["metavar"] = _metavar(spec)
    group.add_argument(spec.flag, *spec.aliases, **kwargs)


def _metavar(spec: FieldSpec) -> str:
    if spec.kind == "str" and any(
        w in spec.key for w in ("path", "data", "checkpoint", "load", "save", "dir")
    ):
        return "PATH"
    return spec.kind.upper()


_TYPE_WORDS = {"bool": "a boolean (true/false)", "int": "an integer", "float": "a number", "str": "a string"}


def coerce(spec: FieldSpec, value: Any, where: str) -> Any:
    """Check a YAML value against ``spec`` and return it in the field's type.

    ``where`` names the source ("config.yaml") for the message. Numbers written like ``1e-6``
    (a string to YAML 1.1) are accepted for float fields.
    """

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: key '{spec.key}' expects {expected}, got {value!r}")

    if value is None:
        if spec.optional:
            return None
        raise fail(_describe(spec))
    if spec.kind == "tuple":
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_scalar(spec.elem, v, lambda: fail(f"a list of {spec.elem} values")) for v in items)
    if spec.kind == "mapping":
        if isinstance(value, str):
            try:
                value = parse_json_object(value)
            except argparse.ArgumentTypeError:
                raise fail("a mapping (or a JSON object string)") from None
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        return dict(value)
    result = _scalar(spec.kind, value, lambda: fail(_describe(spec)))
    if spec.choices is not None and result not in spec.choices:
        raise fail(_describe(spec))
    return result


def _describe(spec: FieldSpec) -> str:
    if spec.choices:
        text = "one of " + ", ".join(map(str, spec.choices))
    else:
        text = _TYPE_WORDS[spec.kind]
    return text + (" or null" if spec.optional else "")


def _scalar(kind: str, value: Any, fail: typing.Callable[[], ConfigError]) -> Any:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and is_number and isinstance(value, int):
        return value
    if kind == "float" and is_number:
        return float(value)
    if kind == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind == "str" and isinstance(value, str):
        return value
    raise fail()


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def check_bounds(spec: FieldSpec, value: Any) -> str | None:
    """The message for a numeric value outside the field's bounds, or None when it is inside."""
    if value is None or not spec.bounds or isinstance(value, bool):
        return None
    ok = {
        "ge": lambda b: value >= b,
        "gt": lambda b: value > b,
        "le": lambda b: value <= b,
        "lt": lambda b: value < b,
    }
    if all(ok[name](b) for name, b in spec.bounds):
        return None
    bounds = dict(spec.bounds)
    if len(bounds) == 2 and set(bounds) & {"ge", "gt"} and set(bounds) & {"le", "lt"}:
        lo = "[" if "ge" in bounds else "("
        hi = "]" if "le" in bounds else ")"
        low = bounds.get("ge", bounds.get("gt"))
        high = bounds.get("le", bounds.get("lt"))
        return f"{spec.flag} must be in {lo}{_num(low)}, {_num(high)}{hi}, got {value}"
    name, b = spec.bounds[0]
    return f"{spec.flag} must be {_BOUND_TEXT[name]} {_num(b)}, got {value}"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def to_plain(obj: Any) -> Any:
    """A dataclass tree as YAML-safe plain data (dicts, lists, scalars)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`ConfigError` instead of printing and exiting, so
    that library callers get an exception and the CLI prints every error the same way."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def unknown_argument_error(extras: list[str], parser: argparse.ArgumentParser) -> ConfigError:
    """The error for arguments ``parser`` did not recognize, naming the closest known flag."""
    from miles.utils.suggest import did_you_mean

    token = next((t for t in extras if t.startswith("-")), extras[0])
    if not token.startswith("-"):
        return ConfigError(f"unexpected argument {token!r}")
    flag = token.split("=", 1)[0]
    hint = did_you_mean(flag, [o for o in parser._option_string_actions if o.startswith("--")])
    if flag.startswith("--sglang-"):
        return ConfigError(
            f"unrecognized argument {flag}: neither a Miles flag nor a known SGLang option{hint}"
        )
    return ConfigError(f"unrecognized argument {flag}{hint}")


def read_yaml_items(path: str, prefixes: Mapping[str, str]) -> list[tuple[str, Any]]:
    """The (key, value) pairs of a YAML config file, in file order.

    Keys may be flat or nested one level under a section name from ``prefixes`` (section ->
    key prefix); a nested key gets its section's prefix unless it already has it. yaml is
    imported here, so only runs that use a config file pay for it.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: invalid YAML: {e}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        section = str(key).replace("-", "_")
        if section in prefixes and isinstance(value, dict):
            prefix = prefixes[section]
            for sub_key, sub_value in value.items():
                sub = str(sub_key)
                items.append((sub if sub.replace("-", "_").startswith(prefix) else prefix + sub, sub_value))
        else:
            items.append((str(key), value))
    return items

"""Options declared once: a dataclass field that carries its help, range, choices and spellings.

Contract:
- `option(default, help, ...)` is a `dataclasses.field` whose metadata is an `Option`: the
  one-line help, the range (`low`/`high` inclusive, `above` an exclusive low), the choices, the
  environment variable, the command line's spelling (flag, short flag, metavar; `cli=False`:
  not on the command line), whether it travels in a server body or a batch line (`wire`), and
  `parse`, which turns what a user typed (a string, or a list of strings) into the value.
- `specs(cls)` lists a config class's options in declaration order, a nested config group
  (`SamplingSettings` inside `RequestParams`) flattened: each a `Spec` with its name, its
  group, its type and its default. The click options, the server's body schema, the batch
  line's keys, the presets' keys and the docs' tables are all generated from these.
- `coerce(spec, value)` turns a plain value (Python, JSON, TOML, a command line's strings) into
  the option's type, and `check(obj)` checks every option of a config object (type, finite,
  range, choices); both raise `SettingError(field, message)`, the message naming the field.
- `build(cls, values, base=None)` makes a config object from plain values by option name, over
  `base` (nested groups filled by their own fields' names); unknown names are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from .errors import UserError


class SettingError(UserError, ValueError):
    """A setting with a wrong type or out of range; `field` (and `param`) is its name."""

    def __init__(self, field: str, message: str):
        super().__init__(message, field)
        self.field = field


@dataclass(frozen=True)
class Option:
    help: str
    low: float | None = None
    high: float | None = None
    above: bool = False              # low is exclusive
    choices: tuple | None = None
    env: str | None = None           # the environment variable the command line reads
    flag: str | None = None          # default: --name-with-hyphens
    short: str | None = None
    metavar: str | None = None
    cli: bool = True                 # on the command line
    wire: bool = True                # in a server body and a batch line (request options)
    hint: str = ""                   # said after a range, e.g. "(0 turns it off)"
    rule: str | None = None          # the range in words, where the generic wording is worse
    high_rule: str | None = None     # ... for a value above `high`, where that differs
    parse: Callable[[Any], Any] | None = None  # a user's string(s) -> the value
    show: str | None = None          # the default as the help shows it, where repr would not do


def option(default, help: str, **how) -> Any:
    """A dataclass field declared as an option (see `Option` for `how`)."""
    meta = {"option": Option(help, **how)}
    if isinstance(default, (dict, list, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Spec:
    name: str
    group: str | None    # the nested config field it sits in (None: top level)
    type: Any
    default: Any
    option: Option

    @property
    def flag(self) -> str:
        return self.option.flag or "--" + self.name.replace("_", "-")

    @property
    def optional(self) -> bool:
        return _optional(self.type)[1]

    @property
    def base_type(self) -> Any:
        return _optional(self.type)[0]

    @property
    def multiple(self) -> bool:
        return typing.get_origin(self.base_type) in (tuple, dict)


@functools.cache
def specs(cls) -> tuple[Spec, ...]:
    """Every option of a config class, nested groups flattened, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[Spec] = []
    for f in dataclasses.fields(cls):
        if "option" in f.metadata:
            out.append(Spec(f.name, None, hints[f.name], _default(f), f.metadata["option"]))
        elif dataclasses.is_dataclass(hints[f.name]):
            out += [dataclasses.replace(s, group=f.name) for s in specs(hints[f.name])]
    return tuple(out)


@functools.cache
def spec_map(cls) -> dict[str, Spec]:
    return {s.name: s for s in specs(cls)}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          dict: "a JSON object"}


def kind(spec: Spec) -> str:
    """What the option takes, in words (for messages and the docs' tables)."""
    tp = spec.base_type
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        return "a list of strings" if args[0] is str else "a list"
    if origin is dict:
        return f"an object of {_KINDS[args[1]].split(' ', 1)[1]}s by name"
    if spec.option.choices:
        return "one of " + ", ".join(map(str, spec.option.choices))
    return _KINDS.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(spec: Spec, value):
    """A plain value as the option's type, or SettingError naming the option."""
    if value is None and spec.optional:
        return None
    tp = spec.base_type
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    typed_as_user = isinstance(value, str) or \
        isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) or \
        isinstance(value, dict) and origin is tuple  # a mapping for a list: ARMs by path
    if spec.option.parse is not None and typed_as_user:
        try:
            value = spec.option.parse(value)
        except (UserError, ValueError) as exc:  # the parser's words, after the option's name
            raise SettingError(spec.name, f"{spec.name} {exc}") from None
    if origin is tuple:
        if isinstance(value, str) and args[0] is str:
            value = (value,)
        if isinstance(value, (list, tuple)) and all(_is(v, args[0]) for v in value):
            return tuple(_as(v, args[0]) for v in value)
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) and _is(v, args[1])
                                           for k, v in value.items()):
            return {k: _as(v, args[1]) for k, v in value.items()}
    elif _is(value, tp):
        return _as(value, tp)
    shown = repr(value) if not isinstance(value, str) else f'"{value}"'
    raise SettingError(spec.name, f"{spec.name} must be {kind(spec)}, not {shown[:80]}")


def _is(value, tp) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, (str, os.PathLike))
    if tp is int:  # numpy's integers are Integral too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return isinstance(value, tp)


def _as(value, tp):
    if tp is str:
        return os.fspath(value)
    return float(value) if tp is float else int(value) if tp is int else value


def check(obj) -> None:
    """Every option of a config object (nested groups too) against its declaration."""
    for spec in specs(type(obj)):
        holder = getattr(obj, spec.group) if spec.group else obj
        check_value(spec, getattr(holder, spec.name))


def check_value(spec: Spec, value) -> None:
    value = coerce(spec, value)
    if value is None or spec.base_type is dict:  # a JSON object: its own checker reads it
        return
    opt = spec.option
    if opt.choices is not None and value not in opt.choices:
        raise SettingError(spec.name, f"{spec.name} must be one of "
                           f"{', '.join(map(str, opt.choices))}, got {value!r}")
    items = value.items() if isinstance(value, dict) else \
        ((None, v) for v in (value if isinstance(value, tuple) else (value,)))
    for key, v in items:
        where = spec.name if key is None else f"{spec.name} {key}"
        if isinstance(v, str) and spec.base_type is not str:
            if not v:
                raise SettingError(spec.name, f"{where} must be a non-empty string")
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            _in_range(spec, v, where)


def _in_range(spec: Spec, v, where: str) -> None:
    opt = spec.option
    if opt.low is None and opt.high is None:
        if isinstance(v, float) and not math.isfinite(v):
            raise SettingError(spec.name, f"{where} must be a finite number, got {v}")
        return
    ok = math.isfinite(v) and (opt.low is None or (v > opt.low if opt.above else v >= opt.low)) \
        and (opt.high is None or v <= opt.high)
    if ok:
        return
    low, high = _num(opt.low), _num(opt.high)
    number = "a finite number " if isinstance(v, float) else ""
    if opt.high_rule and math.isfinite(v) and v > opt.high:
        rule = opt.high_rule
    elif opt.rule:
        rule = opt.rule
    elif opt.above:
        rule = f"in ({low}, {high}]"
    elif opt.high is None:
        rule = f"{number}>= {low}"
    elif opt.low is None:
        rule = f"{number}<= {high}"
    else:
        rule = f"between {low} and {high}"
    hint = f" {opt.hint}" if opt.hint else ""
    raise SettingError(spec.name, f"{where} must be {rule}{hint}, got {v}")


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def build(cls, values: dict, base=None):
    """A config object from plain values by option name, over `base` (default: the defaults;
    its own class when given). Nested groups take their own options' names; an unknown name is
    refused."""
    known = spec_map(type(base) if base is not None else cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingError(unknown[0], f"unknown option {unknown[0]!r}; the options are "
                           f"{', '.join(sorted(known))}")
    obj = base if base is not None else cls()
    cls = type(obj)
    top: dict = {}
    groups: dict[str, dict] = {}
    for name, value in values.items():
        spec = known[name]
        value = coerce(spec, value)
        (groups.setdefault(spec.group, {}) if spec.group else top)[name] = value
    for group, changes in groups.items():
        top[group] = dataclasses.replace(getattr(obj, group), **changes)
    return dataclasses.replace(obj, **top)

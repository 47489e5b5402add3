"""JSON read into typed, frozen dataclasses: each value checked against its field's type hint.

JSON (and Python's reader of it) is looser than a config may be: `true` is an integer to Python, a
float field would take NaN, Infinity or an integer too large for a float, and a key written twice
keeps its last value silently. So values are taken only in the exact type a field declares (Literal,
Optional, fixed- and variable-length tuples, nested dataclasses), and a duplicate key is an error.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections import Counter
from typing import Any, Callable, Literal, Optional

from app.errors import ConfigError, SettingError

FieldValue = Callable[[Any, Any, dataclasses.Field, str], Any]
"""(value, type hint, field, dotted key) -> the value the field takes, or SettingError."""


def type_name(tp: Any) -> str:
    """How an error names a type: "an integer", "one of "cos", "linear"", "a list of 3 numbers"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        return f"a list of {type_name(typing.get_args(tp)[0]).removeprefix('a ')}s"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def show(value: Any, limit: int = 60) -> str:
    """A value as JSON, cut short: an error stays one readable line whatever was in the file."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _finite_float(value: Any) -> Optional[float]:
    """JSON (Python's) reads NaN, Infinity and integers too large for a float; no setting can use them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` as type `tp`, or SettingError naming `where` (a dotted key, with [i] for list items)."""
    origin = typing.get_origin(tp)
    ok = False
    if origin is Literal:
        ok = value in typing.get_args(tp) and not isinstance(value, bool)
    elif origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, where)
            except SettingError as e:
                if e.key != where:  # an item of a list is wrong: that says more than the whole list's type
                    raise
                continue
    elif origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        if isinstance(value, (list, tuple)):
            return tuple(coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value))
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif tp is type(None):
        ok = value is None
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        number = _finite_float(value)
        ok = number is not None
        value = number if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise SettingError(where, f"must be {type_name(tp)}, got {show(value)}")
    return value


class _JsonObject(dict):
    """A JSON object that remembers a key it held twice: json.loads keeps the last value silently."""

    duplicate: Optional[str] = None

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _JsonObject:
        obj = cls(pairs)
        if len(obj) < len(pairs):
            obj.duplicate = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        return obj


def loads(text: str) -> Any:
    """json.loads whose objects remember a duplicate key, for `build` to refuse."""
    return json.loads(text, object_pairs_hook=_JsonObject.from_pairs)


def build(cls: type, raw: Any, source: str, field_value: FieldValue, prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a JSON object: nested dataclasses from nested objects, every
    other field through `field_value`; missing keys take the field's default. Errors name `source`
    and the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be an object")
    duplicate = getattr(raw, "duplicate", None)
    if duplicate is not None:
        raise ConfigError(f"{source}: duplicate key '{prefix}{duplicate}'; keep only one")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}'")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, source, field_value, f"{key}.")
            continue
        try:
            kwargs[name] = field_value(value, tp, fields[name], key)
        except SettingError as e:
            raise ConfigError(f"{source}: {e}") from None
    return cls(**kwargs)


def field_of(cls: type, key: str) -> tuple[Any, dataclasses.Field]:
    """The type hint and field of the dotted `key` ("optimizer.lr") in nested dataclass `cls`."""
    *sections, leaf = key.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    return typing.get_type_hints(cls)[leaf], {f.name: f for f in dataclasses.fields(cls)}[leaf]

"""Type checks of config dataclasses, driven by their field annotations (one place for every process's configs).

`check_fields(obj)` (call it first in `__post_init__`) checks every field against its annotation and stores the
normalized value; a wrong value raises ValueError naming the field and the value. The rules:

- `bool`: true or false only (not the string "false", not 0/1).
- `int`: an integer (not a bool, not 2.5, not "3").
- `float`: a finite number (inf, nan and integers beyond a float's range are refused as "not a finite number"); a
  numeric string is read as the number it spells, because PyYAML reads `1e-4` (no dot) as the string "1e-4", so
  `lr: 1e-4` means 0.0001.
- `str`: a string. `X | None`: also null (a non-finite number is still refused as such, not as "not a number").
- `tuple[T, ...]` / `tuple[A, B]`: a list (never a bare string or number) of such values; stored as a tuple.
- a dataclass (e.g. `lora: LoraSettings`): an instance, or a mapping of its fields (`from_mapping`): unknown keys
  and missing required fields are errors, each value is converted by its annotation (so a dataclass that does not
  call check_fields itself is checked too). A dataclass may define `check_keys(values)` (a staticmethod or
  classmethod raising ValueError) to refuse keys that do not go together; it gets the given keys' converted values.

Every error names the key by its dotted path, as a user finds it in the YAML file: `lora.rank must be an integer,
got 'x'`, `devices[0].share must be a number ...`, `unknown setting server.windw_s (known: ...)`. A nested
dataclass's own checks (check_keys, __post_init__) speak of the section as a whole and are prefixed with its path
and a colon (`network.loss: a choice distribution needs values`). Range checks elsewhere follow the same style.

Ranges (steps >= 1, share in [0, 1) ...) stay in each class's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Collection
from typing import Any


def describe(tp: Any) -> str:
    """What a value of annotation `tp` must be, in words."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(args[0])
            return f"a list of {plural}" if plural else f"a list, each item {describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class WrongType(ValueError):
    """A value of another type than its annotation's (not one of the right type out of range, such as inf)."""


def _wrong(name: str, value: Any, tp: Any) -> WrongType:
    return WrongType(f"{name} must be {describe(tp)}, got {value!r}")


def _finite(name: str, value: int | float) -> float:
    """`value` as a finite float; inf, nan and an integer beyond a float's range (10**400) are a ValueError."""
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an integer of {len(str(abs(value)))} digits") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _scalar(name: str, value: Any, tp: type) -> Any:
    """A bool, int, float or str value checked (floats also from numeric strings)."""
    if tp is float and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _wrong(name, value, tp) from None
    if isinstance(value, bool) != (tp is bool):
        raise _wrong(name, value, tp)
    if tp is float and isinstance(value, int | float):
        return _finite(name, value)
    if tp is not float and isinstance(value, tp):
        return value
    raise _wrong(name, value, tp)


def _nested(name: str, value: Any, tp: type) -> Any:
    """A dataclass field given as an instance or a mapping of its fields."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise _wrong(name, value, tp)
    return from_mapping(tp, value, name)


def key_path(section: str, key: Any) -> str:
    """The dotted path of `key` in the mapping at `section` (`server.window_s`; just the key at the top level)."""
    return f"{section}.{key}" if section else str(key)


def _settings(kind: str, paths: list[str]) -> str:
    """'KIND setting PATH' or 'KIND settings PATH, PATH ...'."""
    return f"{kind} setting{'s' if len(paths) > 1 else ''} {', '.join(paths)}"


def unknown_settings(names: list[str], known: Collection[str]) -> str:
    """'unknown setting NAME; did you mean KNOWN?' (or settings, each with its nearest known name, if any): for a
    flat config too long to list its known names, such as the edge server's."""
    hints = [m[0] for n in names if (m := difflib.get_close_matches(n, sorted(known), n=1))]
    return _settings("unknown", names) + (f"; did you mean {', '.join(dict.fromkeys(hints))}?" if hints else "")


def _field_values(tp: type, data: dict[Any, Any], name: str) -> dict[str, Any]:
    """`data`'s values converted by `tp`'s annotations (keys checked); errors name each key's path under `name`."""
    fields = [f for f in dataclasses.fields(tp) if f.init]
    known = sorted(f.name for f in fields)
    unknown = [key_path(name, k) for k in sorted(set(data) - set(known), key=str)]
    if unknown:
        raise ValueError(f"{_settings('unknown', unknown)} (known: {', '.join(known)})")
    missing = [key_path(name, f.name) for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(_settings("missing", missing))
    hints = typing.get_type_hints(tp)
    return {key: convert(key_path(name, key), value, hints[key]) for key, value in data.items()}


def from_mapping(tp: type, data: dict[Any, Any], name: str = "") -> Any:
    """Dataclass `tp` built from a mapping of its fields at path `name` ("" for a top-level config; see the module
    docstring). Its own checks (`tp.check_keys`, then `tp(...)`) raise ValueErrors prefixed with `name: `."""
    values = _field_values(tp, data, name)
    try:
        check_keys = getattr(tp, "check_keys", None)
        if check_keys is not None:
            check_keys(values)
        return tp(**values)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}" if name else str(exc)) from None


def convert(name: str, value: Any, tp: Any) -> Any:
    """`value` checked against annotation `tp` (see the module docstring); raises ValueError naming `name`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return convert(name, value, inner)
        except WrongType:
            if inner in (bool, int, float, str):  # "a number or null", not just "a number"
                raise _wrong(name, value, tp) from None
            raise
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _wrong(name, value, tp)
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise _wrong(name, value, tp)
        return tuple(convert(f"{name}[{i}]", v, k) for i, (v, k) in enumerate(zip(value, kinds, strict=True)))
    if dataclasses.is_dataclass(tp):
        return _nested(name, value, tp)
    if tp in (bool, int, float, str):
        return _scalar(name, value, tp)
    return value


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'key: stored -> wanted' (JSON values) for each key of `wanted` whose stored value differs or is missing
    ('not recorded'): what resume checks print."""
    return [f"{k}: {json.dumps(stored[k]) if k in stored else 'not recorded'} -> {json.dumps(wanted[k])}"
            for k in sorted(wanted) if k not in stored or stored[k] != wanted[k]]


def check_at_least(obj: Any, minimum: float, *names: str) -> None:
    """Raise ValueError for the first of `obj`'s fields `names` below `minimum`, naming it and its value."""
    for name in names:
        if getattr(obj, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(obj, name)}")


def check_fields(obj: Any) -> None:
    """Check and normalize every field of dataclass instance `obj` (frozen ones too) against its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, convert(f.name, getattr(obj, f.name), hints[f.name]))

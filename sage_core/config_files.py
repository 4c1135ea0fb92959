"""Config files for every process's CLI: YAML, JSON or TOML by suffix, with every problem as one line.

The server, the simulator and training each turn a file's data into their own typed config; this module only
reads the file, so a missing file, bad encoding or a syntax error reads the same wherever it happens.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

FORMATS = {".json": "JSON", ".toml": "TOML"}  # any other suffix is YAML (JSON is YAML too)


class ConfigFileError(ValueError):
    """A config file that cannot be read or parsed; the message is one line and names the file."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (safe_load keeps the last one, silently dropping
    the first, which for a section means every setting in it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict | set):
                continue  # unhashable; the base loader reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key].line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice is an error (json.loads keeps the last one)."""
    keys = [k for k, _ in pairs]
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise ValueError(f"duplicate key {twice!r}")
    return dict(pairs)


def read_config_file(path: str | Path, suffixes: Sequence[str] | None = None) -> Any:
    """The data in a YAML, JSON (.json) or TOML (.toml) file; an empty file is None. A key given twice in one
    mapping is an error in every format. `suffixes`, if given, are the only file name endings accepted."""
    p = Path(path)
    if suffixes is not None and p.suffix not in suffixes:
        raise ConfigFileError(f"config file {p} must end in {', '.join(suffixes)}")
    if not p.is_file():
        raise ConfigFileError(f"config file {p} does not exist" if not p.exists() else f"{p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read config file {p}: {' '.join(str(exc).split())}") from None
    kind = FORMATS.get(p.suffix, "YAML")
    try:
        if kind == "JSON":
            return json.loads(text, object_pairs_hook=_unique_pairs) if text.strip() else None
        if kind == "TOML":
            return tomllib.loads(text) or None
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigFileError(f"config file {p} is not valid {kind}: {parse_error(exc)}") from None


def parse_error(exc: Exception) -> str:
    """A parser's error on one line (YAML's span several, with a caret under the spot)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())


def read_mapping(path: str | Path, suffixes: Sequence[str] | None = None) -> dict[str, Any]:
    """A config file's top-level mapping of settings ({} for an empty file); anything else is a ConfigFileError."""
    data = read_config_file(path, suffixes)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping of settings, not a {type(data).__name__}")
    return data

"""Typed dataclass configs from TOML-like dicts, with dotted overrides and validation errors.

Every error names the field (as a dotted path), the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union


class ConfigError(ValueError):
    """A config value is wrong; the message names the field, the value and what is allowed."""


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _literal_choices(tp) -> tuple | None:
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    return None


def coerce(path: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from TOML or a CLI string) to type `tp`, or raise ConfigError naming `path`."""
    optional, inner = _is_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    tp = inner
    choices = _literal_choices(tp)
    if choices is not None:
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{path} = {value!r} is not allowed; choose one of {list(choices)}")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {value!r} must be a list")
        return [coerce(f"{path}[{i}]", v, elem) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{path} = {value!r} must be a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{path} = {value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path} = {value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} = {value!r} must be a string")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def from_dict(cls, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a dict, recursing into nested dataclass fields.

    Unknown keys are errors (a typo must not be ignored silently).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a table/dict, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = path or "config"
        raise ConfigError(f"unknown field(s) {unknown} in {where}; valid fields: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, sub)
        else:
            kwargs[name] = coerce(sub, value, tp)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """Dataclass -> plain dict (TOML/JSON-serializable)."""
    return dataclasses.asdict(obj)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for `dotted == "a.b"`, creating tables on the way."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot override {dotted}: {part} is not a table")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`["--model.d_model", "256", "--training.steps=50"]` -> {"model.d_model": "256", ...}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(
                f"unrecognized argument {arg!r}: overrides look like --section.field VALUE "
                "(e.g. --model.d_model 256 or --training.steps=50)"
            )
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            i += 1
            value = args[i]
        out[key] = value
        i += 1
    return out


def check(condition: bool, path: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError 'path = value: allowed' unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{path} = {value!r} is invalid: {allowed}")


def opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A dataclass field with help text (shown by `--help` and `--print-config`)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def describe(cls, prefix: str) -> list[tuple[str, str, Any, str]]:
    """(dotted name, type name, default, help) for every field of a (nested) config dataclass."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, name))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        choices = _literal_choices(tp)
        if choices is not None:
            type_name = "{" + "|".join(map(str, choices)) + "}"
        else:
            type_name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        rows.append((name, type_name, default, f.metadata.get("help", "")))
    return rows

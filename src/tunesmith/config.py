"""Configs: dataclasses filled from YAML plus ``--key value`` overrides (flags win), with one-line errors.

Every recipe uses :func:`parse_cli` (command line) or :func:`build_config` (Python API / dict), so the rules for
types, unknown keys and help text live in one place.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tunesmith.errors import UserError, first_line

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read config ({e.__class__.__name__}: {e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of key: value, got {type(data).__name__}")
    return data


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; strings from the command line are YAML-parsed first."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if "," in value else [value]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return [_coerce(v, inner, where) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and issubclass(tp, str) and hasattr(tp, "__members__"):  # str Enums (TrainingArguments)
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` / `yes` as a boolean
            value = "yes" if value else "no"
        try:
            return tp(value)
        except ValueError:
            raise UserError(f"{where}: must be one of {', '.join(m.value for m in tp)}, got {value!r}") from None
    return value


def build_config(cls: type[T], values: dict, source: str = "config") -> T:
    """Instantiate ``cls`` from a dict, naming the source and the key on any error."""
    fields = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = [f for f in fields if f.replace("_", "") == str(key).replace("_", "").lower()]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{source}: unknown key '{key}'{hint}")
        kwargs[key] = _coerce(value, fields[key], f"{source}: field '{key}'")
    try:
        return cls(**kwargs)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: {first_line(e)}") from None


def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """``--config F --a 1 --b x`` -> (F, {'a': 1, 'b': 'x'}); values are YAML-parsed (``5`` -> 5, ``true`` -> True)."""
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}' (options are --key value)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"  # a bare flag
        i += 1
        if key == "config":
            config_path = value
            continue
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        overrides[key] = value if isinstance(parsed, (dict,)) else parsed
    return config_path, overrides


def help_text(cls, command: str, description: str) -> str:
    lines = [f"usage: tunesmith {command} --config FILE.yaml [--key value ...]", "", description, "",
             "Options (YAML keys; a --key flag overrides the file):"]
    own = list(getattr(cls, "__annotations__", {}))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("hidden")}
    inherited = [f for name, f in fields.items() if name not in own]
    for f in [fields[name] for name in own if name in fields] + inherited:
        if inherited and f is inherited[0]:
            base = next((b.__name__ for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)), "base")
            lines += ["", f"Inherited from {base}:"]
        doc = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        lines.append(f"  --{f.name} (default: {default})")
        if doc:
            lines.append(f"      {doc.splitlines()[0]}")
    return "\n".join(lines) + "\n"


def parse_cli(cls: type[T], argv: list[str], command: str, description: str) -> T | None:
    """Parse a recipe's command line. Returns None after printing help."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cls, command, description), end="")
        return None
    config_path, overrides = parse_overrides(argv)
    values = read_yaml(config_path) if config_path else {}
    values.update(overrides)
    return build_config(cls, values, source=config_path or "command line")


def save_yaml(config, path: str | Path) -> None:
    """Write the resolved config (dataclass) as YAML, atomically."""
    from tunesmith.io import atomic_write_text

    data = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if hasattr(v, "value") and isinstance(getattr(v, "value"), str):
            v = v.value
        if isinstance(v, (str, int, float, bool, type(None))) or (isinstance(v, (list, dict)) and _plain(v)):
            data[f.name] = v
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=True, allow_unicode=True))


def _plain(v) -> bool:
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return isinstance(v, (str, int, float, bool, type(None)))

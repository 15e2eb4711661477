"""Typed dataclass configs: the generic load/save machinery.

Domain configs live beside the code that uses them (``distseg.models.ModelConfig``,
``distseg.data.stream.StreamConfig`` ...). This module turns nested dicts (from YAML, JSON or the
command line) into those dataclasses with strict key checking, and back, so every run folder can
hold the fully resolved config it was trained with.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from distseg.errors import UserError

T = TypeVar("T")

_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$|^0x[0-9a-fA-F_]+$|^0o?[0-7_]+$")
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"
                    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


class ConfigError(UserError, ValueError):
    """A config file or override is malformed (unknown key, wrong type, invalid value)."""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` (dataclasses, tuples, lists, optionals)."""
    origin = typing.get_origin(tp)
    if tp is Any or value is None:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for arg in args:
            try:
                return _coerce(arg, value, where)
            except (ConfigError, TypeError, ValueError):
                continue
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error, naming the key and its place.

    A dataclass whose layout depends on a value (a stage config, whose options section is named after its kind)
    defines ``from_mapping(data, where)`` and ``to_mapping()``; both directions then go through them.
    """
    where = where or cls.__name__
    if hasattr(cls, "from_mapping"):
        return cls.from_mapping(data, where)
    return build_fields(cls, data, where)


def build_fields(cls: type[T], data: dict[str, Any], where: str) -> T:
    """The field-by-field construction behind :func:`from_dict` (strict keys, coerced types)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain JSON/YAML-safe structure; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_mapping"):
            return obj.to_mapping()
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else load_yaml(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError, reported uniformly
        raise ConfigError(f"{path}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 numbers: ``1e-3`` is a float and ``6:1:1`` a string.

    YAML 1.1 (PyYAML's default) wants a dot in a float (``1.0e-3``) and reads ``6:1:1`` as the base-60 integer
    21661. Recipes, stage configs and ``--set`` all come through here, so the README's own notation works everywhere.
    """
    import yaml

    return yaml.load(text, Loader=_yaml12_loader())  # noqa: S506 - a SafeLoader subclass


@functools.cache
def _yaml12_loader() -> type:
    """PyYAML's SafeLoader with its integer and float resolvers replaced by YAML 1.2's."""
    import yaml

    class Loader(yaml.SafeLoader):
        """A safe loader with YAML 1.2's integer and float syntax."""

    numeric = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int")
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in numeric]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))
    return Loader


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b']['c'] = value`` for ``dotted='a.b.c'``, creating mappings on the way."""
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a mapping")
    node[leaf] = value


def load_config(cls: type[T], path: str | Path) -> T:
    """Load dataclass ``cls`` from a YAML/JSON file."""
    return from_dict(cls, read_mapping(path), where=str(path))


def save_config(obj: Any, path: str | Path) -> None:
    """Write a dataclass (or plain structure) as YAML or JSON by suffix, atomically."""
    path = Path(path)
    data = to_dict(obj)
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2, sort_keys=False)
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, returning a copy."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            set_dotted(out, key, load_yaml(raw))
        except ConfigError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
    return out

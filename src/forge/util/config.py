"""YAML + ``key=value`` overrides (OmegaConf) parsed once into typed dataclasses.

``load_config(Schema, path, overrides)`` reads the YAML, applies dotted overrides
(``policy.num_replicas=2``), and builds ``Schema`` recursively. ``build(Schema, mapping,
where)`` is the one mapping-to-dataclass parser of Forge: component configs
(``EngineConfig``, ``SamplingParams``, the trainer's, ``HostsConfig``) use it too. Unknown keys, wrong
types and bad values raise ``ValueError`` naming the dotted field — before anything is
spawned.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{where} must be one of {list(allowed)}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ValueError(f"{where} must be {_type_name(tp)}, got {value!r}")
    return value


def build(schema: type, values: Any, where: str = "config") -> Any:
    """``schema(**values)`` with nested dataclasses, checking names and types."""
    if values is None:
        values = {}
    if isinstance(values, schema):
        return values
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a mapping of {schema.__name__} fields, got {values!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    try:
        return schema(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(schema: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    from omegaconf import OmegaConf

    base = OmegaConf.load(path) if path else OmegaConf.create({})
    dotlist = OmegaConf.create({})
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} must look like key=value (e.g. policy.num_replicas=2)")
        try:
            dotlist = OmegaConf.merge(dotlist, OmegaConf.from_dotlist([override]))
        except Exception as e:  # the value is not valid YAML (yaml / omegaconf errors)
            reason = " ".join(str(e).split())
            hint = "; a mapping needs a space after each colon, e.g. hosts={source: process_job, groups: {gen: 1}}"
            raise ValueError(f"override {override!r}: its value is not valid YAML ({reason})"
                             + (hint if "{" in override else "")) from None
    merged = OmegaConf.merge(base, dotlist)
    return build(schema, OmegaConf.to_container(merged, resolve=True))


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)

"""Dataclasses ⇄ strict JSON, their JSON Schema, and validation of untrusted JSON against them.

Why one module: the run record and the store manifest are both described by
dataclasses; serializing, reading back, publishing a schema and checking what
arrives from disk are the same walk over the same type hints, so they share it.

Conventions: ``None`` fields are left out of the JSON (and a missing field reads
back as its default); non-finite floats are the strings ``"inf"``, ``"-inf"``,
``"nan"`` (strict JSON has no such numbers); ``StrEnum`` members are their values.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from functools import cache
from typing import Any

__all__ = ["to_json", "from_json", "json_schema", "validate", "jsonable", "SchemaError"]

_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class SchemaError(ValueError):
    """JSON that does not match its dataclass; the message names the path."""


def jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become strings; dataclasses, enums and tuples become JSON values."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def to_json(obj: Any) -> dict:
    """A dataclass instance as a strict-JSON dict, ``None`` fields left out."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is not None:
            out[_key(f)] = jsonable(v)
    return out


def _key(f: dataclasses.Field) -> str:
    """The JSON name of a field (``field(metadata={"json": "class"})`` for a Python keyword)."""
    return f.metadata.get("json", f.name)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _args(tp) -> tuple:
    return typing.get_args(tp)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _convert(tp, value, path: str, strict: bool):
    if tp is Any:
        return value
    if _is_union(tp):
        options = _args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path, strict)
            except SchemaError as e:
                errors.append(str(e))
        raise SchemaError(errors[0] if len(errors) == 1 else f"{path}: matches none of {len(errors)} forms")
    origin = typing.get_origin(tp)
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list")
        (item,) = _args(tp)[:1] or (Any,)
        converted = [_convert(item, v, f"{path}[{i}]", strict) for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object")
        _, item = _args(tp) or (str, Any)
        return {k: _convert(item, v, f"{path}.{k}", strict) for k, v in value.items()}
    if tp is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object")
        return value
    if tp is list:
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path, strict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise SchemaError(f"{path}: {value!r} is not one of {[m.value for m in tp]}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{path}: expected true or false")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{path}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and value in _NONFINITE:
            return _NONFINITE[value]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SchemaError(f"{path}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected a string")
        return value
    raise SchemaError(f"{path}: unsupported type {tp}")


def _from_dict(cls: type, value, path: str, strict: bool):
    if not isinstance(value, dict):
        raise SchemaError(f"{path}: expected an object")
    hints = _hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    if strict:
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise SchemaError(f"{path or 'the top level'}: unknown field {unknown[0]!r}")
    kwargs = {}
    for key, f in fields.items():
        if key in value and (value[key] is not None or hints[f.name] is Any):  # null is a value of Any
            kwargs[f.name] = _convert(hints[f.name], value[key], f"{path}.{key}" if path else key, strict)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{path + '.' if path else ''}{key}: missing")
    return cls(**kwargs)


def from_json(cls: type, obj: Any, *, strict: bool = False):
    """Build ``cls`` from JSON, converting nested dataclasses, enums and non-finite floats.

    ``strict`` also refuses unknown fields; either way a wrong type is a ``SchemaError``."""
    return _from_dict(cls, obj, "", strict)


def validate(cls: type, obj: Any) -> None:
    """Raise ``SchemaError`` (naming the path) unless ``obj`` is exactly what ``to_json`` of ``cls`` writes."""
    _from_dict(cls, obj, "", True)


_NUMBER = {"anyOf": [{"type": "number"}, {"enum": ["inf", "-inf", "nan"]}]}


def _schema(tp, defs: dict) -> dict:
    if tp is Any:
        return {}
    if _is_union(tp):
        options = [o for o in _args(tp) if o is not type(None)]
        return _schema(options[0], defs) if len(options) == 1 else {"anyOf": [_schema(o, defs) for o in options]}
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item,) = _args(tp)[:1] or (Any,)
        return {"type": "array", "items": _schema(item, defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema(_args(tp)[1], defs)}
    if tp is dict:
        return {"type": "object"}
    if tp is list:
        return {"type": "array"}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # a placeholder first: dataclasses may refer to themselves
            hints = _hints(tp)
            required = [_key(f) for f in dataclasses.fields(tp)
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            defs[name] = {"type": "object", "description": (tp.__doc__ or "").strip().split("\n")[0],
                          "properties": {_key(f): _schema(hints[f.name], defs) for f in dataclasses.fields(tp)},
                          "required": required, "additionalProperties": False}
        return {"$ref": f"#/$defs/{name}"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return dict(_NUMBER)
    if tp is str:
        return {"type": "string"}
    raise TypeError(f"no JSON Schema for {tp}")


def json_schema(cls: type, *, title: str, schema_id: str) -> dict:
    """The JSON Schema (2020-12) of what ``to_json`` writes for ``cls``."""
    defs: dict = {}
    root = _schema(cls, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id, "title": title,
            **root, "$defs": defs}

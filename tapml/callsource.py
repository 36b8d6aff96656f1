"""A carved op call as Python source: ``torch.ops.aten.gelu.default(x, approximate='none')``.

Why: repro scripts and emitted tests show the call a reader can paste into a
shell, so the encoded arguments of the store are written back as Python
literals, and each tensor input gets a readable name from the op's schema.
"""

from __future__ import annotations

import re
from typing import Any

from .core import OpCall, TapmlError

__all__ = ["call_source", "tensor_names"]

_RENAME = {"self": "x"}  # `self` reads as a method's receiver; the issue's own example calls it x


def _identifier(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    return name if name and not name[0].isdigit() else f"t_{name}"


def tensor_names(op: OpCall) -> list[str]:
    """One unique Python name per tensor input, in the order ``OpCall.inputs`` lists them."""
    schema = [a.name for a in op.func._schema.arguments]
    names: list[str] = []

    def walk(value: Any, base: str) -> None:
        if isinstance(value, list):
            for k, v in enumerate(value):
                walk(v, f"{base}_{k}")
        elif isinstance(value, dict):
            (kind, payload), = value.items()
            if kind == "tensor":
                name, n = base, 1
                while name in names:
                    n += 1
                    name = f"{base}_{n}"
                names.append(name)
            elif kind == "tuple":
                walk(payload, base)
            elif kind == "dict":
                for key, v in payload.items():
                    walk(v, _identifier(_RENAME.get(key, key)))

    for i, value in enumerate(op.args):
        arg = schema[i] if i < len(schema) else f"arg{i}"
        walk(value, _identifier(_RENAME.get(arg, arg)))
    walk(op.kwargs, "")
    return names


def _literal(value: Any, names: list[str]) -> str:
    """An encoded value as Python source; tensors take the next name of ``names`` (consumed in order)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v, names) for v in value) + "]"
    (kind, payload), = value.items()
    if kind == "tensor":
        return names.pop(0)
    if kind == "tuple":
        items = [_literal(v, names) for v in payload]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if kind == "dict":
        return "{" + ", ".join(f"{k!r}: {_literal(v, names)}" for k, v in payload.items()) + "}"
    if kind == "float":
        return f"float({payload!r})"
    if kind == "dtype":
        return f"torch.{payload}"
    if kind == "device":
        return f"torch.device({payload!r})"
    if kind in ("memory_format", "layout"):
        return f"torch.{payload}"
    if kind == "complex":
        return repr(complex(*payload))
    raise TapmlError(f"cannot write {kind} {payload!r} as Python source")


def call_source(op: OpCall, names: list[str] | None = None) -> str:
    """``torch.ops.<ns>.<name>.<overload>(args..., key=value...)`` with tensors by name."""
    pending = list(names if names is not None else tensor_names(op))
    args = [_literal(v, pending) for v in op.args]
    (_, kwargs), = op.kwargs.items()
    args += [f"{k}={_literal(v, pending)}" for k, v in kwargs.items()]
    return f"torch.ops.{op.op}({', '.join(args)})"

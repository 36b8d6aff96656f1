"""JSON-safe encoding of operator arguments and results.

Plain JSON values (None, bool, int, float, str, lists) stand for themselves;
everything else is a one-key object (``{"tensor": ...}``, ``{"dtype": "float32"}``,
...), so decoding is unambiguous and nothing is ever pickled. Carving writes this
encoding; ``OpCall`` carries it to platforms, locally or over RPC.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .tensors import dtype_from_name, dtype_name

__all__ = ["encode", "decode_value", "iter_specs", "Opaque"]

_MEMORY_FORMATS = {
    str(f).removeprefix("torch."): f
    for f in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)
}
_LAYOUTS = {str(lay).removeprefix("torch."): lay for lay in (torch.strided, torch.sparse_coo)}


class Opaque(ValueError):
    """A recorded value that cannot be rebuilt (a generator, a Python object)."""


def encode(value: Any, on_tensor: Callable[[torch.Tensor], dict]) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": on_tensor(value)}
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        items = [encode(v, on_tensor) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: encode(v, on_tensor) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    return {"opaque": type(value).__name__}


def decode_value(value: Any, tensor) -> Any:
    """Rebuild an encoded value; ``tensor(payload)`` supplies each tensor."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode_value(v, tensor) for v in value]
    (kind, payload), = value.items()
    if kind == "tensor":
        return tensor(payload)
    if kind == "tuple":
        return tuple(decode_value(v, tensor) for v in payload)
    if kind == "dict":
        return {k: decode_value(v, tensor) for k, v in payload.items()}
    if kind == "float":
        return float(payload)
    if kind == "dtype":
        return dtype_from_name(payload)
    if kind == "device":
        return torch.device(payload)
    if kind == "memory_format":
        return _MEMORY_FORMATS[payload]
    if kind == "layout":
        return _LAYOUTS[payload]
    if kind == "complex":
        return complex(*payload)
    raise Opaque(f"cannot rebuild a recorded {payload} value")


def iter_specs(value):
    """Every ``{"tensor": ...}`` payload inside an encoded value, in order."""
    if isinstance(value, list):
        for v in value:
            yield from iter_specs(v)
    elif isinstance(value, dict):
        (kind, payload), = value.items()
        if kind == "tensor":
            yield payload
        elif kind == "tuple":
            yield from iter_specs(payload)
        elif kind == "dict":
            yield from iter_specs(list(payload.values()))

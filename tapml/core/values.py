"""JSON-safe encoding of operator arguments and results.

Plain JSON values (None, bool, int, float, str, lists) stand for themselves;
everything else is a one-key object (``{"tensor": ...}``, ``{"dtype": "float32"}``,
...), so decoding is unambiguous and nothing is ever pickled. Carving writes this
encoding; ``OpCall`` carries it to platforms, locally or over RPC. Encoded values
also arrive from stores and the wire, so ``check_value`` validates one fully
before anything decodes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .tensors import dtype_from_name, dtype_name

__all__ = ["encode", "decode_value", "iter_specs", "tensors_in", "only_tensors", "check_value", "check_spec", "Opaque",
           "MalformedValue"]

_MEMORY_FORMATS = {
    str(f).removeprefix("torch."): f
    for f in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)
}
_LAYOUTS = {str(lay).removeprefix("torch."): lay for lay in (torch.strided, torch.sparse_coo, torch.sparse_csr)}
_DEVICES = ("cpu", "cuda", "meta")
_MAX_DEPTH = 32
_MAX_DIMS = 64
_MAX_INT = 1 << 48  # sizes, strides and offsets beyond this are not a real tensor's


class Opaque(ValueError):
    """A recorded value that cannot be rebuilt (a generator, a Python object)."""


class MalformedValue(ValueError):
    """An encoded value that is not what ``encode`` writes; the message says where."""


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


def tensors_in(value) -> list:
    """The tensors in a live args/kwargs/result structure, in the order ``encode`` (and so ``iter_specs``)
    visits them: lists, tuples and dict values, depth first."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


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


def only_tensors(value) -> bool:
    """True when an encoded result is tensors only (no Python scalars, no None)."""
    if isinstance(value, list):
        return all(only_tensors(v) for v in value)
    if isinstance(value, dict):
        (kind, payload), = value.items()
        return kind == "tensor" or (kind == "tuple" and only_tensors(payload))
    return False


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and -_MAX_INT < x < _MAX_INT


def check_spec(spec: Any, where: str = "tensor") -> None:
    """A tensor payload: dtype from the table, shape and strides as equal-length int lists."""
    if not isinstance(spec, dict):
        raise MalformedValue(f"{where}: not an object")
    try:
        dtype_from_name(spec.get("dtype"))
    except (ValueError, TypeError) as e:
        raise MalformedValue(f"{where}: {e}") from None
    shape, stride = spec.get("shape"), spec.get("stride")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_int(s) and s >= 0 for s in shape):
        raise MalformedValue(f"{where}: shape must be a list of non-negative integers")
    if not isinstance(stride, list) or len(stride) != len(shape) or not all(_int(s) and s >= 0 for s in stride):
        raise MalformedValue(f"{where}: stride must be a list of non-negative integers, one per dim")
    offset = spec.get("offset", 0)
    if not _int(offset) or offset < 0:
        raise MalformedValue(f"{where}: offset must be a non-negative integer")
    if not isinstance(spec.get("exact", True), bool) or not isinstance(spec.get("storage", False), bool):
        raise MalformedValue(f"{where}: exact and storage must be booleans")
    if "key" in spec and not isinstance(spec["key"], str):
        raise MalformedValue(f"{where}: key must be a string")


def check_value(value: Any, where: str = "value", depth: int = 0,
                spec: Callable[[Any, str], None] = check_spec) -> None:
    """Raise ``MalformedValue`` unless ``value`` is exactly what ``encode`` can write; ``spec`` checks each
    tensor payload (a store that lists tensor uses once refers to them by index)."""
    if depth > _MAX_DEPTH:
        raise MalformedValue(f"{where}: nested too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedValue(f"{where}: a non-finite float must be encoded as {{\"float\": ...}}")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            if v is None or type(v) is int or type(v) is bool:  # the common leaves, without a call
                continue
            check_value(v, f"{where}[{i}]", depth + 1, spec)
        return
    if not isinstance(value, dict) or len(value) != 1:
        raise MalformedValue(f"{where}: expected a JSON value or a one-key object")
    (kind, payload), = value.items()
    if kind == "tensor":
        spec(payload, where)
    elif kind == "tuple":
        if not isinstance(payload, list):
            raise MalformedValue(f"{where}: a tuple must hold a list")
        check_value(payload, where, depth + 1, spec)
    elif kind == "dict":
        if not isinstance(payload, dict) or not all(isinstance(k, str) for k in payload):
            raise MalformedValue(f"{where}: a dict must map strings to values")
        for k, v in payload.items():
            check_value(v, f"{where}.{k}", depth + 1, spec)
    elif kind == "float":
        if not isinstance(payload, str) or payload not in ("inf", "-inf", "nan"):
            raise MalformedValue(f"{where}: float {payload!r} is not inf, -inf or nan")
    elif kind == "dtype":
        try:
            dtype_from_name(payload)
        except (ValueError, TypeError) as e:
            raise MalformedValue(f"{where}: {e}") from None
    elif kind == "device":
        if not isinstance(payload, str) or payload.split(":")[0] not in _DEVICES or \
                (":" in payload and not payload.split(":", 1)[1].isdigit()):
            raise MalformedValue(f"{where}: device {payload!r} is not cpu, cuda[:N] or meta")
    elif kind == "memory_format":
        if not isinstance(payload, str) or payload not in _MEMORY_FORMATS:
            raise MalformedValue(f"{where}: unknown memory format {payload!r}")
    elif kind == "layout":
        if not isinstance(payload, str) or payload not in _LAYOUTS:
            raise MalformedValue(f"{where}: unknown layout {payload!r}")
    elif kind == "complex":
        if not (isinstance(payload, list) and len(payload) == 2 and all(isinstance(x, (int, float))
                                                                        and not isinstance(x, bool) for x in payload)):
            raise MalformedValue(f"{where}: complex must be [real, imag]")
    elif kind == "opaque":
        if not isinstance(payload, str):
            raise MalformedValue(f"{where}: opaque must name a type")
    else:
        raise MalformedValue(f"{where}: unknown kind {kind!r}")

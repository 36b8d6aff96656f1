"""``OpCall``: one operator call as a platform sees it — plain JSON, no tensor values.

Why plain data: the same description is compiled locally or sent over RPC to a
worker, so it must cross a socket as JSON (never pickle) and hash to a stable
signature that keys compile caches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from .tensors import TensorSpec
from .values import decode_value, iter_specs

__all__ = ["OpCall", "bind_args", "flatten_outputs"]


@dataclass(frozen=True)
class OpCall:
    """What to compute: the overload, its arguments (tensors as specs) and what it returned."""

    op: str
    args: Any  # encoded: tensors appear as {"tensor": spec-json}
    kwargs: Any
    outputs: Any
    signature: str
    module: str = ""
    index: int = -1
    call: int = 0
    view: bool = False
    inplace: bool = False
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def inputs(self) -> list[TensorSpec]:
        """Specs of the tensor inputs, in the order ``bind_args`` consumes them."""
        return [TensorSpec.from_json(s) for s in iter_specs([self.args, self.kwargs])]

    @property
    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(s) for s in iter_specs(self.outputs)]

    @property
    def tensor_outputs_only(self) -> bool:
        """True when every output is a tensor (platforms return tensors, not Python scalars)."""
        return _only_tensors(self.outputs)

    def to_json(self) -> dict:
        return {
            "op": self.op, "args": self.args, "kwargs": self.kwargs, "outputs": self.outputs,
            "signature": self.signature, "module": self.module, "index": self.index, "call": self.call,
            "view": self.view, "inplace": self.inplace,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, obj: dict) -> OpCall:
        return cls(**{k: obj[k] for k in ("op", "args", "kwargs", "outputs", "signature")},
                   module=obj.get("module", ""), index=obj.get("index", -1), call=obj.get("call", 0),
                   view=obj.get("view", False), inplace=obj.get("inplace", False))

    @classmethod
    def loads(cls, text: str) -> OpCall:
        return cls.from_json(json.loads(text))


def _only_tensors(value) -> bool:
    if isinstance(value, list):
        return all(_only_tensors(v) for v in value)
    if isinstance(value, dict):
        (kind, payload), = value.items()
        return kind == "tensor" or (kind == "tuple" and _only_tensors(payload))
    return False


def bind_args(op: OpCall, tensors: list[torch.Tensor], *, device: str | None = None) -> tuple[list, dict]:
    """The call's ``(args, kwargs)`` with ``tensors`` substituted in order.

    ``device`` rewrites recorded device arguments (creation ops) for another device.
    """
    it = iter(tensors)
    args = decode_value(op.args, lambda _: next(it))
    kwargs = decode_value(op.kwargs, lambda _: next(it))
    if device is not None and "device" in kwargs:
        kwargs["device"] = torch.device(device)
    return args, kwargs


def flatten_outputs(value) -> list[torch.Tensor]:
    """An op's result as a flat list of tensors, in ``iter_specs(outputs)`` order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    raise TypeError(f"op returned a non-tensor {type(value).__name__}")

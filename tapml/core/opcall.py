"""``OpCall``: one operator call as a platform sees it — plain JSON, no tensor values.

Why plain data: the same description is compiled locally or sent over RPC to a
worker, so it must cross a socket as JSON (never pickle) and hash to a stable
signature that keys compile caches. It is validated when built: the op name
resolves only through the allow-list (``ops.resolve_op``), the encoded values
must be what the codec writes, and in-place/view facts and the signature are
derived from the content — never taken from whoever sent it, so a client or a
store cannot poison a kernel cache shared with others.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from .errors import OpRefused
from .ops import OpInfo, op_info, resolve_op
from .tensors import TensorSpec
from .values import MalformedValue, check_value, decode_value, iter_specs, only_tensors

__all__ = ["OpCall", "bind_args", "flatten_outputs", "place_device"]

_SPEC_ONLY = ("key", "offset", "exact")  # per-call facts that do not change the kernel


@dataclass(frozen=True)
class OpCall:
    """What to compute: the overload, its arguments (tensors as specs) and what it returned."""

    op: str
    args: Any  # encoded: tensors appear as {"tensor": spec-json}
    kwargs: Any
    outputs: Any
    module: str = ""
    index: int = -1
    call: int = 0
    library: str = ""  # the module that registers the op's namespace, when it is not aten/prims

    def __post_init__(self) -> None:
        self.func  # noqa: B018 — resolve through the allow-list now, not at run time
        try:
            check_value(self.args, "args")
            check_value(self.kwargs, "kwargs")
            check_value(self.outputs, "outputs")
        except MalformedValue as e:
            raise OpRefused(f"op {self.op}: malformed call: {e}") from None
        if not (isinstance(self.kwargs, dict) and set(self.kwargs) == {"dict"}) or not isinstance(self.args, list):
            raise OpRefused(f"op {self.op}: args must be a list and kwargs a dict")
        if not isinstance(self.module, str) or not isinstance(self.index, int) or not isinstance(self.call, int):
            raise OpRefused(f"op {self.op}: module, index and call must be a string and integers")

    @cached_property
    def func(self) -> torch._ops.OpOverload:
        return resolve_op(self.op, self.library if isinstance(self.library, str) else None)

    @cached_property
    def info(self) -> OpInfo:
        return op_info(self.func)

    @property
    def view(self) -> bool:
        return self.info.view

    @property
    def inplace(self) -> bool:
        return self.info.inplace

    @cached_property
    def signature(self) -> str:
        """What a compiled kernel depends on: the overload, tensor dtypes/shapes/strides, other arguments."""
        text = json.dumps([self.op, _strip(self.args), _strip(self.kwargs)], separators=(",", ":"), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @cached_property
    def inputs(self) -> list[TensorSpec]:
        """Specs of the tensor inputs, in the order ``bind_args`` consumes them."""
        return [TensorSpec.from_json(s) for s in iter_specs([self.args, self.kwargs])]

    @cached_property
    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(s) for s in iter_specs(self.outputs)]

    @property
    def tensor_outputs_only(self) -> bool:
        """True when every output is a tensor (platforms return tensors, not Python scalars)."""
        return only_tensors(self.outputs)

    def to_json(self) -> dict:
        out = {"op": self.op, "args": self.args, "kwargs": self.kwargs, "outputs": self.outputs,
               "module": self.module, "index": self.index, "call": self.call}
        if self.library:
            out["library"] = self.library
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, obj: Any) -> OpCall:
        """Build from untrusted JSON; anything malformed is ``OpRefused``."""
        if not isinstance(obj, dict) or not all(k in obj for k in ("op", "args", "kwargs", "outputs")):
            raise OpRefused("an op call must be an object with op, args, kwargs and outputs")
        return cls(op=obj["op"], args=obj["args"], kwargs=obj["kwargs"], outputs=obj["outputs"],
                   module=obj.get("module", ""), index=obj.get("index", -1), call=obj.get("call", 0),
                   library=obj.get("library") or "")

    @classmethod
    def loads(cls, text: str) -> OpCall:
        try:
            obj = json.loads(text)
        except (TypeError, ValueError) as e:
            raise OpRefused(f"an op call is not JSON: {e}") from None
        return cls.from_json(obj)


def _strip(value):
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, dict):
        (kind, payload), = value.items()
        if kind == "tensor":
            return {"tensor": {k: v for k, v in payload.items() if k not in _SPEC_ONLY}}
        if kind == "tuple":
            return {"tuple": _strip(payload)}
        if kind == "dict":
            return {"dict": {k: _strip(v) for k, v in payload.items()}}
    return value


def bind_args(op: OpCall, tensors: list[torch.Tensor], *, device: str | None = None) -> tuple[list, dict]:
    """The call's ``(args, kwargs)`` with ``tensors`` substituted in order.

    A recorded device argument (creation ops, ``_to_copy``) is rewritten for ``device`` (default: the
    first tensor's, else the CPU), so a store carved on CUDA replays on the CPU and the reverse.
    """
    it = iter(tensors)
    args = decode_value(op.args, lambda _: next(it))
    kwargs = decode_value(op.kwargs, lambda _: next(it))
    return args, place_device(kwargs, device if device is not None else (tensors[0].device if tensors else "cpu"))


def place_device(kwargs: dict, device: str | torch.device) -> dict:
    """``kwargs`` with a recorded ``cpu``/``cuda`` device argument replaced by ``device`` (others kept)."""
    recorded = kwargs.get("device")
    if isinstance(recorded, torch.device) and recorded.type in ("cpu", "cuda"):
        kwargs["device"] = torch.device(device)
    return kwargs


def flatten_outputs(value) -> list[torch.Tensor]:
    """An op's result as a flat list of tensors, in ``iter_specs(outputs)`` order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    raise TypeError(f"op returned a non-tensor {type(value).__name__}")

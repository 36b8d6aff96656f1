"""``UnitProgram``: a unit (``tapml.core.UnitCall``) as a ``torch.nn.Module`` a platform can run or export.

Why a module over the carved nodes: eager PyTorch runs it op for op (the identity
target, bit-exact with the carve), a reduced-precision emulator runs it with every
float cast down, the float64 oracle runs it widened, and a compiler traces it
with ``torch.export`` into one graph it can fuse — the same program every time.
Every node's overload was resolved through the allow-list when the unit was built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tapml.core import UnitCall, decode_value, dtype_from_name, flatten_outputs

__all__ = ["UnitProgram", "cast_floats", "run_program"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cast_floats(value: Any, dtype: torch.dtype, kinds: tuple[torch.dtype, ...] = _FLOATS) -> Any:
    """``value`` with every tensor (and dtype argument) of one of ``kinds`` (default: every float) in ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype in kinds else value
    if isinstance(value, torch.dtype):
        return dtype if value in kinds else value
    if isinstance(value, list):
        return [cast_floats(v, dtype, kinds) for v in value]
    if isinstance(value, tuple):
        return tuple(cast_floats(v, dtype, kinds) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype, kinds) for k, v in value.items()}
    return value


def _without_legacy_empty(args: list) -> list:
    """``cat``'s tensors without 1-D empty ones: torch skips them (a KV cache starts as a ``(0,)``
    tensor concatenated with 4-D keys), compilers reject mixed ranks; the result is the same."""
    tensors = args[0] if args and isinstance(args[0], (list, tuple)) else None
    if not tensors:
        return args
    kept = [t for t in tensors if not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == 0)]
    if not kept or len(kept) == len(tensors):
        return args
    return [kept, *args[1:]]


class UnitProgram(torch.nn.Module):
    """``forward(*inputs)`` runs the unit's nodes in order and returns its outputs as a tuple.

    ``compute`` casts every float to that dtype on the way into each node (reduced
    precision, or float64 for the oracle); ``keep`` also collects every node's
    outputs in ``self.values`` (the kernel-level localization matches against them)."""

    def __init__(self, unit: UnitCall, *, compute: torch.dtype | None = None, keep: bool = False):
        super().__init__()
        self.unit, self.compute, self.keep = unit, compute, keep
        self.values: list[list[torch.Tensor]] = []

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values: list[list[torch.Tensor]] = []

        def value(spec: dict) -> torch.Tensor:
            j, k = spec["src"]
            return inputs[k] if j == -1 else values[j][k]

        def carved(spec: dict) -> torch.Tensor:  # the value in the dtype the carve saw there
            return value(spec).to(dtype_from_name(spec["dtype"]))

        for call in self.unit.calls:
            args = decode_value(call.args, value)
            kwargs = decode_value(call.kwargs, value)
            if self.compute is not None:
                args, kwargs = cast_floats(args, self.compute), cast_floats(kwargs, self.compute)
            try:
                out = self._call(call, args, kwargs)
            except RuntimeError:
                if self.compute is None:
                    raise
                # no kernel in that dtype (``_grouped_mm`` in float64): this node in the carve's dtypes,
                # its result cast like the rest
                out = cast_floats(self._call(call, decode_value(call.args, carved), decode_value(call.kwargs, carved)),
                                  self.compute)
            values.append(flatten_outputs(out))
        if self.keep:
            self.values = values
        return tuple(inputs[k] if j == -1 else values[j][k] for j, k in self.unit.outputs)

    def _call(self, call, args: list, kwargs: dict):
        if call.op == "aten.cat.default":
            args = _without_legacy_empty(args)
        return self.node(call, args, kwargs)

    def node(self, call, args: list, kwargs: dict):
        """One node's call (a fault-injecting platform overrides this to alter one op inside units)."""
        return call.func(*args, **kwargs)


def run_program(unit: UnitCall, inputs: list[torch.Tensor], *, compute: torch.dtype | None = None,
                after: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Run the unit eagerly (no autograd); ``after(tensor, output index)`` post-processes each output."""
    with torch.no_grad():
        outs = UnitProgram(unit, compute=compute)(*inputs)
    return [after(o, i) if after else o for i, o in enumerate(outs)]

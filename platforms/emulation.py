"""``fp16`` and ``bf16``: emulate half-precision hardware on the CPU.

Rules: floating inputs (and float dtype arguments, so creation ops follow) are
cast to the reduced type, the op runs there, and each output is cast back to
the dtype the reference produced. Integer and bool tensors pass through
unchanged, so integer ops are exact. An op PyTorch has no CPU kernel for in the
reduced type is ``unsupported`` with PyTorch's message. These show the failure
classes of emerging platforms: fp16 overflow (max 65504) of attention scores,
precision loss in long reductions.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch

from tapml.core import OpCall, UnitCall, bind_args, flatten_outputs, relayout

from .base import Capabilities, Unsupported
from .program import UnitProgram, cast_floats
from .torch_eager import TorchPlatform

__all__ = ["ReducedPrecision", "Float16", "BFloat16"]

_WIDE = (torch.float32, torch.float64)


def _narrow(value, reduced: torch.dtype):
    """float32/float64 tensors and dtype arguments in the reduced type (narrower ones stay as they are)."""
    return cast_floats(value, reduced, _WIDE)


class ReducedPrecision(TorchPlatform):
    reduced: ClassVar[torch.dtype] = torch.float16

    def capabilities(self) -> Capabilities:
        return Capabilities(device="cpu (emulated)", compute_dtype=str(self.reduced).removeprefix("torch."),
                            float64=False)

    def compile(self, op: OpCall) -> Any:
        kernel = super().compile(op)
        # a trial on zeros finds ops with no CPU kernel for the reduced type
        try:
            self._call(kernel, op, [torch.zeros(s.shape, dtype=s.torch_dtype) for s in op.inputs])
        except (RuntimeError, NotImplementedError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "not implemented for" in message or "Half" in message or "BFloat16" in message:
                raise Unsupported(f"PyTorch CPU has no {self.name} kernel: {message}") from None
        return kernel

    def _call(self, kernel, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        args, kwargs = bind_args(op, inputs)
        with torch.no_grad():
            outs = flatten_outputs(kernel(*_narrow(args, self.reduced), **_narrow(kwargs, self.reduced)))
        return [o.to(spec.torch_dtype) for o, spec in zip(outs, op.output_specs, strict=True)]

    def run(self, kernel: Any, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        laid = [relayout(t, spec, copy=op.inplace) for t, spec in zip(inputs, op.inputs, strict=True)]
        return self._call(kernel, op, laid)

    def compile_graph(self, unit: UnitCall) -> Any:
        return partial(UnitProgram, compute=self.reduced)  # every intermediate stays in the reduced type

    def run_graph(self, kernel: Any, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        laid = [relayout(t, spec, copy=False) for t, spec in zip(inputs, unit.input_specs, strict=True)]
        with torch.no_grad():
            outs = kernel(unit)(*laid)
        return [o.to(spec.torch_dtype) for o, spec in zip(outs, unit.output_specs, strict=True)]


class Float16(ReducedPrecision):
    name = "fp16"
    description = "float16 hardware, emulated: float inputs cast to fp16, outputs cast back"
    reduced = torch.float16


class BFloat16(ReducedPrecision):
    name = "bf16"
    description = "bfloat16 hardware, emulated: float inputs cast to bf16, outputs cast back"
    reduced = torch.bfloat16

"""A CPU stand-in for a GPU that computes float32 matmuls in TF32: contraction operands rounded to 10 mantissa bits."""

from __future__ import annotations

import torch

from tapml.judging.bounds import op_class
from tapml.judging.judge import _tf32
from tapml.platforms import WrappedPlatform


class EmulatedTF32(WrappedPlatform):
    """torch-cpu, except that float32 contractions (mm, addmm, bmm, ...) take TF32-rounded operands."""

    name = "emulated-tf32"
    inner = "torch-cpu"

    def run(self, kernel, op, inputs):
        if op_class(op.op) == "contraction":
            inputs = [_tf32(t) if t.dtype == torch.float32 else t for t in inputs]
        return super().run(kernel, op, inputs)


class DroppedTerm(WrappedPlatform):
    """torch-cpu, except that contractions drop the last term of each sum (a bug, whatever bound it fits)."""

    name = "dropped-term"
    inner = "torch-cpu"

    def run(self, kernel, op, inputs):
        if op.op == "aten.addmm.default":
            bias, a, b = inputs
            a = a.clone()
            a[..., -1] = 0
            inputs = [bias, a, b]
        return super().run(kernel, op, inputs)

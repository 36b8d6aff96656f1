"""``torch-cpu`` and ``torch-cuda``: the aten op itself, run eagerly by PyTorch.

``torch-cpu`` is the identity target — its local error on carved fixtures is
exactly zero, which checks the whole pipeline (store, wire, relayout) end to end.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tapml.core import OpCall, UnitCall, bind_args, flatten_outputs, relayout

from .base import ALL_DTYPES, Capabilities, Platform, Support
from .program import UnitProgram

# PyTorch runs every dtype it has: complex and the unsigned integers too
TORCH_DTYPES = ALL_DTYPES + ("complex64", "complex128", "complex32", "uint16", "uint32", "uint64")

__all__ = ["TorchPlatform", "TorchCUDA", "TorchCUDATF32"]


class TorchPlatform(Platform):
    name = "torch-cpu"
    description = "PyTorch eager on this CPU (the identity target: local error exactly 0)"
    device = "cpu"

    def capabilities(self) -> Capabilities:
        return Capabilities(device=self.device, dtypes=TORCH_DTYPES)

    def compile(self, op: OpCall) -> Any:
        return op.func

    def run(self, kernel: Any, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # each input in its recorded layout: some kernels take other paths for other strides;
        # a private copy only for in-place ops, which would write into the caller's tensor
        laid = [relayout(t.to(self.device), spec, copy=op.inplace) for t, spec in zip(inputs, op.inputs, strict=True)]
        args, kwargs = bind_args(op, laid, device=self.device)
        with torch.no_grad():
            return [o.cpu() for o in flatten_outputs(kernel(*args, **kwargs))]

    def runner(self, kernel: Any, op: OpCall):
        """``run`` with the argument binding done once: each call puts its tensors into the recorded
        arguments' slots (a platform that overrides ``run``, or an op whose tensors sit inside a list
        argument, keeps the general path)."""
        if type(self).run is not TorchPlatform.run:
            return super().runner(kernel, op)
        slots = [_Slot(i) for i in range(len(op.inputs))]
        args, kwargs = bind_args(op, slots, device=self.device)
        arg_slots = [(j, a.index) for j, a in enumerate(args) if isinstance(a, _Slot)]
        kwarg_slots = [(k, v.index) for k, v in kwargs.items() if isinstance(v, _Slot)]
        if len(arg_slots) + len(kwarg_slots) != len(slots):
            return super().runner(kernel, op)
        layout = [(spec, spec.stride, spec.offset) for spec in op.inputs]
        on_cpu = self.device == "cpu"
        as_is = not op.inplace and on_cpu  # an input already in its recorded layout is used as is

        def run(placed: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            laid = [t if as_is and t.stride() == stride and t.storage_offset() == offset and t.device.type == "cpu"
                    else relayout(t.to(self.device), spec, copy=op.inplace)
                    for t, (spec, stride, offset) in zip(inputs, layout, strict=True)]
            a, kw = list(args), dict(kwargs)
            for j, i in arg_slots:
                a[j] = laid[i]
            for k, i in kwarg_slots:
                kw[k] = laid[i]
            if not torch.is_grad_enabled():  # (a worker's data loop runs without autograd)
                outputs = flatten_outputs(kernel(*a, **kw))
            else:
                with torch.no_grad():
                    outputs = flatten_outputs(kernel(*a, **kw))
            return outputs if on_cpu else [o.cpu() for o in outputs]

        return run

    def compile_graph(self, unit: UnitCall) -> Any:
        # eager: nothing to compile; the program is built per call, over that call's unit (the same
        # signature may come from several module calls, each with its own node modules)
        return UnitProgram

    def run_graph(self, kernel: Any, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # a unit never writes its inputs (the engine refuses such units): no private copies
        laid = [relayout(t.to(self.device), spec, copy=False) for t, spec in zip(inputs, unit.input_specs,
                                                                                 strict=True)]
        with torch.no_grad():
            return [o.cpu() for o in kernel(unit)(*laid)]


class _Slot:
    """Where an input tensor goes in a call's bound arguments."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class TorchCUDA(TorchPlatform):
    name = "torch-cuda"
    description = ("PyTorch eager on the first CUDA GPU, float32 matmuls and convolutions in float32 (TF32 off, "
                   "no reduced-precision reductions)")
    device = "cuda"
    tf32: ClassVar[bool] = False  # TF32 tensor cores for float32 matmuls and convolutions

    @classmethod
    def availability(cls) -> Support:
        if not torch.cuda.is_available():
            return Support.no("no CUDA device visible to PyTorch on this machine")
        return Support.yes()

    def capabilities(self) -> Capabilities:
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
        return Capabilities(device=f"cuda:0 ({name})", dtypes=TORCH_DTYPES, limits=(("tf32", int(self.tf32)),))

    def run(self, kernel: Any, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """With this platform's precision (PyTorch's switches are process-wide: set per call, then put back):
        TF32 off also turns off float16/bfloat16 matmuls' reduced-precision reductions (PyTorch allows them by
        default), so every matmul accumulates in at least float32; TF32 on leaves those at PyTorch's default."""
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        names = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
        saved = matmul.allow_tf32, cudnn.allow_tf32, [getattr(matmul, n) for n in names]
        matmul.allow_tf32 = cudnn.allow_tf32 = self.tf32
        if not self.tf32:
            for n in names:
                setattr(matmul, n, False)
        try:
            return super().run(kernel, op, inputs)
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved[:2]
            for n, v in zip(names, saved[2], strict=True):
                setattr(matmul, n, v)


class TorchCUDATF32(TorchCUDA):
    name = "torch-cuda-tf32"
    description = "PyTorch eager on the first CUDA GPU, float32 matmuls and convolutions in TF32 (10-bit mantissa)"
    tf32 = True

"""Fault platforms for ``benchmarks/localization.py``: torch-cpu with one numerical behaviour changed.

Why: a localization rule is only as good as its two error rates. A ``legit`` fault is what a
correct compiler may do (another summation order, wider or compensated accumulation, another
but equally accurate formula): it touches every op of its family and must not be flagged. A
``bug`` fault is a real defect injected at exactly one op call (``module``/``call`` plus
``match``), so the culprit a run names can be checked against it.

Every class is a ``tapml.platforms.WrappedPlatform`` plugin, loadable as
``benchmarks/faults.py:Class``. ``TAPML_FAULT_BACKGROUND=LegitClass`` makes a bug platform also
apply that legitimate deviation to every other op (a bug hidden among harmless differences).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

from tapml.core import OpCall, bind_args
from tapml.platforms import WrappedPlatform

MATMULS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default")
REDUCTIONS = ("aten.sum.dim_IntList", "aten.mean.dim")
SOFTMAX = "aten._softmax.default"
LAYER_NORM = "aten.native_layer_norm.default"
FLOAT32_EPS = 2.0**-24  # unit roundoff of float32


class Fault(WrappedPlatform):
    """torch-cpu, except for the ops ``hit`` selects, which ``compute`` recomputes."""

    inner = "torch-cpu"
    kind: ClassVar[str] = "legit"  # legit | bug
    ops: ClassVar[tuple[str, ...]] = ()
    module: ClassVar[str | None] = None  # bugs: the one module path (and call) they break
    call: ClassVar[int] = 0
    what: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        background = os.environ.get("TAPML_FAULT_BACKGROUND")
        cls = globals().get(background) if background and self.kind == "bug" else None
        self.background: Fault | None = cls() if isinstance(cls, type) and issubclass(cls, Fault) else None

    def match(self, op: OpCall) -> bool:
        """Extra condition where (op, module, call) alone is ambiguous."""
        return True

    def hit(self, op: OpCall) -> bool:
        if op.op not in self.ops or not self.match(op):
            return False
        return self.module is None or (op.module == self.module and op.call == self.call)

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def run(self, kernel: Any, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.hit(op):
            with torch.no_grad():
                outs = self.compute(op, inputs)
            return [o.to(getattr(torch, s.dtype)).contiguous() for o, s in zip(outs, op.output_specs, strict=True)]
        if self.background is not None:
            return self.background.run(kernel, op, inputs)
        return super().run(kernel, op, inputs)


# ---------------------------------------------------------------------------------------------- helpers


def _matmul_args(op: OpCall, inputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor,
                                                                   torch.Tensor, float, float]:
    """(bias, a, b, beta, alpha) of mm/bmm/addmm/baddbmm."""
    args, kwargs = bind_args(op, inputs)
    if op.op in ("aten.mm.default", "aten.bmm.default"):
        return None, args[0], args[1], 0.0, 1.0
    beta = kwargs.get("beta", args[3] if len(args) > 3 else 1)
    alpha = kwargs.get("alpha", args[4] if len(args) > 4 else 1)
    return args[0], args[1], args[2], float(beta), float(alpha)


def _finish(bias: torch.Tensor | None, prod: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """alpha·prod + beta·bias as separate float32 ops (the identity factors are skipped)."""
    out = prod if alpha == 1 else prod * alpha
    if bias is not None and beta != 0:
        out = out + (bias if beta == 1 else bias * beta)
    return out


def _flatten_reduced(x: torch.Tensor, dims: list[int] | None) -> torch.Tensor:
    """``x`` with the reduced dims moved last and merged into one."""
    dims = list(range(x.dim())) if not dims else [d % x.dim() for d in dims]
    keep = [d for d in range(x.dim()) if d not in dims]
    y = x.permute(*keep, *dims)
    return y.reshape(*[x.shape[d] for d in keep], -1)


def _sum_last(x: torch.Tensor, method: str) -> torch.Tensor:
    """Sum over the last dim, in float32: ``pairwise`` (torch), ``sequential`` or ``kahan``."""
    if method == "pairwise":
        return x.sum(-1)
    s = torch.zeros(x.shape[:-1], dtype=x.dtype)
    c = torch.zeros_like(s)
    for k in range(x.shape[-1]):
        if method == "sequential":
            s = s + x[..., k]
        else:  # Kahan: carry each addition's rounding error into the next
            y = x[..., k] - c
            t = s + y
            c = (t - s) - y
            s = t
    return s


def _reduce(op: OpCall, inputs: list[torch.Tensor], method: str) -> list[torch.Tensor]:
    args, kwargs = bind_args(op, inputs)
    x, dims = args[0], (args[1] if len(args) > 1 else kwargs.get("dim"))
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if kwargs.get("dtype") is not None:
        x = x.to(kwargs["dtype"])
    flat = _flatten_reduced(x, dims)
    out = _sum_last(flat, method)
    if op.op == "aten.mean.dim":
        out = out / flat.shape[-1]
    if keepdim:
        for d in sorted(d % x.dim() for d in (dims or range(x.dim()))):
            out = out.unsqueeze(d)
    return [out]


def _layer_norm(op: OpCall, inputs: list[torch.Tensor], method: str, eps: float | None = None) -> list[torch.Tensor]:
    """Two-pass layer norm: mean, then the mean of squared deviations, each summed by ``method``."""
    args, _ = bind_args(op, inputs)
    x, shape, weight, bias, model_eps = args[0], args[1], args[2], args[3], args[4]
    n = len(shape)
    flat = x.reshape(*x.shape[: x.dim() - n], -1)
    count = flat.shape[-1]
    mean = (_sum_last(flat, method) / count).unsqueeze(-1)
    dev = flat - mean
    var = (_sum_last(dev * dev, method) / count).unsqueeze(-1)
    rstd = torch.rsqrt(var + (model_eps if eps is None else eps))
    out = (dev * rstd).reshape(x.shape)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    stat_shape = (*x.shape[: x.dim() - n], *([1] * n))
    return [out, mean.reshape(stat_shape), rstd.reshape(stat_shape)]


def _softmax(op: OpCall, inputs: list[torch.Tensor], exp=torch.exp, method: str = "pairwise",
             wide: bool = False) -> list[torch.Tensor]:
    """exp(x - max) / sum, the textbook way, with a chosen exp, summation and precision."""
    args, _ = bind_args(op, inputs)
    x, dim = args[0], args[1]
    if wide:
        x = x.double()
    y = x - x.amax(dim, keepdim=True)
    e = exp(y)
    denom = _sum_last(e.movedim(dim, -1), method).unsqueeze(-1).movedim(-1, dim)
    return [e / denom]


def approx_exp(y: torch.Tensor) -> torch.Tensor:
    """An exp that is up to 1000 float32 ULP off, wobbling with x (a plain scale would cancel in softmax)."""
    e = torch.exp(y)
    wobble = 1 + 1000 * FLOAT32_EPS * torch.cos(7 * y)  # NaN where 7y overflows, but exp(y) is 0 there
    return torch.where(e > 0, e * wobble, e)


# ---------------------------------------------------------------------------------- legitimate deviations


class BlockedMatmul(Fault):
    """Split-K matmul: K cut into blocks of 32, the block products summed last block first, in float32,
    then the bias added — another summation order, as tiled GPU/NPU kernels have."""

    ops = MATMULS
    block = 32
    what = "K in blocks of 32, partial sums added in reverse order, bias last"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        bias, a, b, beta, alpha = _matmul_args(op, inputs)
        k = a.shape[-1]
        parts = [a[..., i:i + self.block] @ b[..., i:i + self.block, :] for i in range(0, k, self.block)]
        acc = parts[-1]
        for p in reversed(parts[:-1]):
            acc = acc + p
        return [_finish(bias, acc, beta, alpha)]


class UnfusedBias(Fault):
    """addmm as a matmul followed by a separate float32 bias add (no fused epilogue)."""

    ops = ("aten.addmm.default", "aten.baddbmm.default")
    what = "(A@B) then + bias as its own float32 op"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        bias, a, b, beta, alpha = _matmul_args(op, inputs)
        return [_finish(bias, a @ b, beta, alpha)]


class WideAccumulate(Fault):
    """Matmuls accumulated in float64 (FMA chains / wide accumulators) and rounded once: more accurate."""

    ops = MATMULS
    what = "float64 products and sums, rounded to float32 once"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        bias, a, b, beta, alpha = _matmul_args(op, inputs)
        prod = a.double() @ b.double()
        out = prod * alpha + (bias.double() * beta if bias is not None and beta != 0 else 0)
        return [out.float()]


class SequentialSum(Fault):
    """Every reduction (sum/mean, layer-norm statistics, softmax denominator) as a plain left-to-right
    float32 loop instead of torch's pairwise/vectorized order."""

    ops = (*REDUCTIONS, LAYER_NORM, SOFTMAX)
    method = "sequential"
    what = "left-to-right float32 accumulation"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if op.op == LAYER_NORM:
            return _layer_norm(op, inputs, self.method)
        if op.op == SOFTMAX:
            return _softmax(op, inputs, method=self.method)
        return _reduce(op, inputs, self.method)


class KahanSum(SequentialSum):
    """The same reductions with Kahan-compensated float32 sums (more accurate than torch's)."""

    method = "kahan"
    what = "Kahan-compensated float32 accumulation"


class Softmax64(Fault):
    """Softmax as exp(x - max) / sum evaluated in float64, rounded once."""

    ops = (SOFTMAX,)
    what = "exp(x-max)/sum in float64, rounded"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return _softmax(op, inputs, wide=True)


class TwoPassLayerNorm(Fault):
    """Layer norm as mean, then variance of the deviations (two passes, float32), then (x-mean)·rstd·w + b."""

    ops = (LAYER_NORM,)
    what = "two-pass float32 statistics, unfused affine"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return _layer_norm(op, inputs, "pairwise")


class UlpElementwise(Fault):
    """Equivalent formulas a few ULP apart: silu = x/(1+exp(-x)), rsqrt = 1/sqrt, gelu/tanh in float64."""

    ops = ("aten.silu.default", "aten.rsqrt.default", "aten.gelu.default", "aten.tanh.default")
    what = "silu as x/(1+exp(-x)), rsqrt as 1/sqrt, gelu and tanh via float64"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        args, kwargs = bind_args(op, inputs)
        x = args[0]
        if op.op == "aten.silu.default":
            return [x / (1 + torch.exp(-x))]
        if op.op == "aten.rsqrt.default":
            return [1 / torch.sqrt(x)]
        return [op.func(x.double(), *args[1:], **kwargs)]


# ----------------------------------------------------------------------------------------------- bugs


class BF16Matmul(Fault):
    """One addmm computed in bfloat16 (inputs rounded to bf16, product and bias add in bf16)."""

    kind = "bug"
    ops = ("aten.addmm.default",)
    module = "encoder.layer.0.intermediate.dense"
    what = "bf16 inputs and accumulation in one linear"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        bias, a, b, beta, alpha = _matmul_args(op, inputs)
        return [torch.addmm(bias.bfloat16(), a.bfloat16(), b.bfloat16(), beta=beta, alpha=alpha).float()]


class DropLastK(Fault):
    """One matmul whose loop bound is off by one: the last element of K is never accumulated."""

    kind = "bug"
    ops = MATMULS
    module = "layers.1.mlp.down_proj"
    what = "K loop stops one short"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        bias, a, b, beta, alpha = _matmul_args(op, inputs)
        return [_finish(bias, a[..., :-1] @ b[..., :-1, :], beta, alpha)]


class ExpSoftmax(Fault):
    """One attention softmax built on an exp approximation ~1000 ULP off."""

    kind = "bug"
    ops = (SOFTMAX,)
    module = "encoder.layer.3.attention.self"
    what = "softmax with exp(x)·(1 + 1000·2^-24·cos 7x)"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return _softmax(op, inputs, exp=approx_exp)


class ExpSilu(Fault):
    """One SiLU whose sigmoid uses the same ~1000 ULP exp approximation."""

    kind = "bug"
    ops = ("aten.silu.default",)
    module = "layers.0.mlp"
    what = "silu = x/(1+exp~(-x)), exp ~1000 ULP off"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0]
        return [x / (1 + approx_exp(-x))]


class LayerNormEps(Fault):
    """One layer norm using eps 1e-3 instead of the model's (1e-12 for MiniLM)."""

    kind = "bug"
    ops = (LAYER_NORM,)
    module = "encoder.layer.5.output.LayerNorm"
    what = "eps 1e-3 instead of the model's"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        args, kwargs = bind_args(op, inputs)
        args = [*args[:4], 1e-3]
        return list(op.func(*args, **kwargs))


class MaskLate(Fault):
    """The causal mask applied one position late: each query also sees the next token."""

    kind = "bug"
    ops = ("aten.add.Tensor",)
    module = "layers.0.self_attn"
    what = "causal mask shifted right by one key position"

    def match(self, op: OpCall) -> bool:  # the scores + mask add, not the rotary adds of the same module
        return len(op.inputs) == 2 and len(op.inputs[1].shape) == 4 and op.inputs[1].shape[:2] == (1, 1)

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        scores, mask = inputs
        late = torch.roll(mask, 1, dims=-1)
        late[..., 0] = 0
        return [scores + late]


class ScaledElement(Fault):
    """One element (the largest in magnitude) of one op's output 0.1% too large, in a later call of a
    signature that the isolated pass would otherwise only check on its first call."""

    kind = "bug"
    ops = ("aten.mul.Tensor",)
    module = "encoder.layer.4.attention.self"
    what = "largest |element| × 1.001"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        args, kwargs = bind_args(op, inputs)
        out = op.func(*args, **kwargs).contiguous().clone()
        flat = out.view(-1)
        i = int(flat.abs().argmax())
        flat[i] = flat[i] * 1.001
        return [out]


class GeluTanh(Fault):
    """One GELU using the tanh approximation where the model asks for the exact (erf) form."""

    kind = "bug"
    ops = ("aten.gelu.default",)
    module = "encoder.layer.1.intermediate.intermediate_act_fn"
    what = "tanh-approximate GELU instead of erf"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.nn.functional.gelu(inputs[0], approximate="tanh")]


class FastRsqrt(Fault):
    """One rsqrt done as the 0x5f3759df bit trick with two Newton steps (~5e-6 relative, ~80 ULP)."""

    kind = "bug"
    ops = ("aten.rsqrt.default",)
    module = "layers.0.post_attention_layernorm"
    what = "bit-trick rsqrt + 2 Newton steps"

    def compute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0].float().contiguous()
        y = (0x5F3759DF - (x.view(torch.int32) >> 1)).view(torch.float32)
        for _ in range(2):
            y = y * (1.5 - 0.5 * x * y * y)
        return [y]


LEGIT = [c.__name__ for c in (BlockedMatmul, UnfusedBias, WideAccumulate, SequentialSum, KahanSum, Softmax64,
                              TwoPassLayerNorm, UlpElementwise)]
BUGS = [c.__name__ for c in (BF16Matmul, DropLastK, ExpSoftmax, ExpSilu, LayerNormEps, MaskLate, ScaledElement,
                             GeluTanh, FastRsqrt)]

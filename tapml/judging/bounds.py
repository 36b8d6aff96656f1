"""Error bounds: how far any correct implementation of an op may land from the exact result.

Why: a target that sums in another order, fuses a multiply-add or keeps more
precision is not wrong, and ``assert_close``'s fixed tolerances cannot tell that
from a kernel that accumulates in a narrow type or drops a term. Error analysis
can (Higham, *Accuracy and Stability of Numerical Algorithms*; Higham & Mary
2019 for the √K·u realistic form). Each op class gets an elementwise bound on
|result − exact|, computed in float64 from the op's own inputs; a healthy target
sits below it (usually near the reference, also measured against it), a bug far
above. The constants are measured, not guessed: see the README's bound section.

Notation: u is the unit roundoff of the compute dtype; |A|·|B| is the same op on
absolute values in float64 (one extra call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tapml.core import OpCall, bind_args

from .blocked import call_widened

__all__ = ["Bound", "op_bounds", "unit_roundoff", "LAMBDA", "ULPS", "TRANSCENDENTAL_ULPS", "op_class"]

# the realistic-form constant: measured on zoo:minilm, TVM-llvm's addmm error is <= 0.2 of 4·√K·u·|A||B|,
# MKL's <= 0.08; an fp16 or bf16 accumulation, or one dropped term of K, lands hundreds of times above it
LAMBDA = 4.0
ULPS = 4  # correctly rounded arithmetic, FMA against separate rounding: a couple of ULPs of the result
TRANSCENDENTAL_ULPS = 16  # libm-quality exp/erf/tanh/...: a few ULPs; vectorized approximations some more

_U = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}

CONTRACTIONS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mv", "addmv", "dot", "vdot", "addbmm",
                          "addr", "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "einsum", "tensordot"})
REDUCTIONS = frozenset({"sum", "mean", "nansum", "nanmean", "cumsum", "logcumsumexp", "norm", "linalg_vector_norm",
                        "frobenius_norm", "logsumexp"})
SOFTMAX = frozenset({"_softmax", "softmax", "_safe_softmax"})
LOG_SOFTMAX = frozenset({"_log_softmax", "log_softmax"})
NORMS = frozenset({"native_layer_norm", "native_group_norm"})
ATTENTION = frozenset({"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
                       "scaled_dot_product_attention", "_scaled_dot_product_efficient_attention",
                       "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention"})
TRANSCENDENTAL = frozenset({"exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "tanh", "sigmoid", "erf", "erfc",
                            "erfinv", "gelu", "silu", "mish", "softplus", "pow", "sin", "cos", "tan", "asin", "acos",
                            "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "rsqrt", "sqrt", "elu",
                            "selu", "celu", "logit", "lgamma", "digamma", "xlogy", "special_xlog1py", "hardswish",
                            "hardsigmoid", "leaky_relu", "log_sigmoid_forward", "glu", "sinc"})
# ops that only move or select values: exact up to the rounding into the output dtype
MOVEMENT = frozenset({"clone", "_to_copy", "copy", "copy_", "cat", "stack", "index", "index_select", "gather",
                      "embedding", "slice_scatter", "select_scatter", "index_put", "index_put_", "scatter", "scatter_",
                      "masked_fill", "masked_fill_", "where", "constant_pad_nd", "repeat", "roll", "flip", "tril",
                      "triu", "fill", "fill_", "zeros_like", "ones_like", "full_like", "arange", "full", "zeros",
                      "ones", "scalar_tensor", "lift_fresh_copy", "alias_copy", "expand_copy", "permute_copy",
                      "view_copy", "new_zeros", "new_ones", "new_full", "relu", "relu_", "threshold", "clamp",
                      "clamp_min", "clamp_max", "hardtanh", "abs", "neg", "sign", "maximum", "minimum", "max",
                      "min", "amax", "amin", "sort", "topk", "kthvalue", "median", "cummax", "cummin", "zero_",
                      "_unsafe_view", "unfold", "col2im", "im2col", "pixel_shuffle", "max_pool2d_with_indices",
                      "max_pool1d", "max_pool2d", "max_pool3d", "upsample_nearest2d", "reflection_pad2d",
                      "replication_pad2d", "_index_put_impl_"})


def unit_roundoff(dtype: str) -> float:
    return _U.get(dtype, 2.0**-24)


@dataclass
class Bound:
    """Per output: the allowed |result − exact| (float64, elementwise) and the formula that gave it."""

    tensor: torch.Tensor
    form: str


def op_class(name: str) -> str:
    """The family an overload's bound comes from (``aten.addmm.default`` → ``contraction``)."""
    base = name.split(".")[1] if name.count(".") >= 2 else name
    for family, members in (("contraction", CONTRACTIONS), ("reduction", REDUCTIONS), ("softmax", SOFTMAX),
                            ("log_softmax", LOG_SOFTMAX), ("norm", NORMS), ("attention", ATTENTION),
                            ("transcendental", TRANSCENDENTAL), ("movement", MOVEMENT)):
        if base in members:
            return family
    return "other"


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of each value in ``dtype`` (the spacing of that dtype there), as float64."""
    if not dtype.is_floating_point:
        return torch.zeros_like(x)
    info = torch.finfo(dtype)
    mag = x.abs().nan_to_num(0.0, posinf=info.max, neginf=info.max).clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def _widened_abs(value):
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value
        # widened into new memory, made absolute in place there: one float64 copy of a big weight, not two
        return value.abs() if value.dtype == torch.float64 else value.double().abs_()
    if isinstance(value, float):
        return abs(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_widened_abs(v) for v in value)
    if isinstance(value, dict):
        return {k: _widened_abs(v) for k, v in value.items()}
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return torch.float64
    return value


def _magnitude(op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The op run in float64 on the absolute values of its inputs (and scalars): |A|·|B|, Σ|x|, ..."""
    try:
        args, kwargs = bind_args(op, inputs)
        with torch.no_grad():
            out = call_widened(op, args, kwargs, _widened_abs)  # a big weight a column block at a time
    except Exception:  # an op that refuses these values: no magnitude, no bound
        return None
    return [o for o in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(o, torch.Tensor)]


def _contracted(op: OpCall, inputs: list[torch.Tensor], name: str) -> int:
    """K: the length of the sums behind each output element."""
    first = 1 if name in ("addmm", "baddbmm", "addmv", "addbmm", "addr") else 0
    floats = [t for t in inputs if t.is_floating_point()]
    if name in ("convolution", "_convolution", "conv1d", "conv2d", "conv3d") and len(floats) >= 2:
        w = floats[1]
        return max(1, math.prod(w.shape[1:]))
    if name in ("einsum", "tensordot") or len(floats) <= first:
        out = op.output_specs[0].numel if op.output_specs else 1
        return max(1, max((t.numel() for t in floats), default=1) // max(out, 1))
    return max(1, floats[first].shape[-1] if floats[first].dim() else 1)


def _reduced(inputs: list[torch.Tensor], exact: torch.Tensor) -> int:
    x = next((t for t in inputs if t.is_floating_point()), None)
    return max(1, (x.numel() // max(exact.numel(), 1)) if x is not None else 1)


def op_bounds(op: OpCall, inputs: list[torch.Tensor], exact: list[torch.Tensor], u: float,
              out_dtypes: list[torch.dtype]) -> list[Bound | None]:
    """A bound per output (None where no bound applies: integer outputs compare exactly, unknown ops
    fall back to the fp64 oracle). ``exact``: the op in float64 on the same inputs."""
    family = op_class(op.op)
    name = op.op.split(".")[1]
    rounding = [_ulp(e, d) if e.is_floating_point() else None for e, d in zip(exact, out_dtypes, strict=True)]
    if family == "movement":
        return [Bound(r, "exact up to rounding into the output dtype") if r is not None else None for r in rounding]
    if family in ("contraction", "reduction"):
        mag = _magnitude(op, inputs)
        if mag is None or len(mag) < 1:
            return [None] * len(exact)
        k = _contracted(op, inputs, name) if family == "contraction" else _reduced(inputs, exact[0])
        c = LAMBDA * math.sqrt(k) * u
        term = "|A|·|B|" if family == "contraction" else "Σ|x|"
        return [Bound(c * m.abs() + 2 * u * e.abs() + r, f"{LAMBDA:g}·√K·u·{term} + 2u·|y| (K={k})")
                if e.is_floating_point() and m.shape == e.shape else None
                for m, e, r in zip(mag + [None] * (len(exact) - len(mag)), exact, rounding, strict=True)]
    if family in ("softmax", "log_softmax"):
        dim = _dim_arg(op)
        n = exact[0].shape[dim] if exact[0].dim() else 1
        c = (LAMBDA * math.sqrt(n) + 8) * u
        if family == "softmax":
            floor = 8 * u * exact[0].abs().amax(dim=dim, keepdim=True) if exact[0].dim() else 8 * u * exact[0].abs()
            return [Bound(c * exact[0].abs() + floor + rounding[0], f"(4·√n + 8)·u·p + 8u·max p (n={n})")]
        return [Bound(c + 4 * u * exact[0].abs() + rounding[0], f"(4·√n + 8)·u + 4u·|y| (n={n})")]
    if family == "norm" and name == "native_layer_norm":
        return _layer_norm(op, inputs, exact, u, rounding)
    if family == "attention":
        return _attention(op, inputs, exact, u, rounding)
    if family == "transcendental" or _pointwise(op):
        ulps = TRANSCENDENTAL_ULPS if family == "transcendental" else ULPS
        out = []
        for e, r in zip(exact, rounding, strict=True):
            if r is None:
                out.append(None)
                continue
            peak = e.abs().nan_to_num(0.0, 0.0, 0.0).max() if e.numel() else e.new_zeros(())
            floor = ulps * u * peak if family == "transcendental" else 0.0
            extra = 0.0
            if family != "transcendental":  # cancellation (a − b, FMA) is measured against |a| + |b|, not |y|
                mag = _magnitude(op, inputs)
                extra = ulps * u * mag[0] if mag and mag[0].shape == e.shape else ulps * u * peak
            out.append(Bound(ulps * r + floor + extra,
                             f"{ulps} ULP + {ulps}u·" + ("max|y|" if family == "transcendental" else "|inputs|")))
        return out
    return [None] * len(exact)


def _pointwise(op: OpCall) -> bool:
    return torch.Tag.pointwise in op.func.tags


def _dim_arg(op: OpCall) -> int:
    args = op.args
    return args[1] if len(args) > 1 and isinstance(args[1], int) else -1


def _layer_norm(op: OpCall, inputs, exact, u: float, rounding) -> list[Bound | None]:
    """y = (x − μ)·r·w + b: the mean and the variance are reductions over n; r = 1/√(var + eps)."""
    args, _ = bind_args(op, inputs)
    x, shape = args[0].double(), list(args[1])
    w = args[2].double() if len(args) > 2 and isinstance(args[2], torch.Tensor) else None
    b = args[3].double() if len(args) > 3 and isinstance(args[3], torch.Tensor) else None
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    n = math.prod(shape)
    y, mu, r = exact[0], exact[1], exact[2]
    if mu.dim() != x.dim():  # a frontend that returns other shapes: compare what it can
        return [None, None, None]
    mean_abs = x.abs().mean(dim=dims, keepdim=True)
    c = LAMBDA * math.sqrt(n) * u
    rel_r = 0.5 * c * (1 + (mu * r) ** 2) + 4 * u  # a one-pass variance loses what E[x]² cancels
    d_mu = c * mean_abs
    centered = (y - b).abs() if b is not None else y.abs()
    wa = w.abs() if w is not None else 1.0
    bound_y = wa * r * d_mu + centered * rel_r + 4 * u * y.abs() + rounding[0]
    form = f"4·√n·u·(|w|·r·mean|x| + |y − b|·(1 + μ²r²)/2) + 4u·|y| (n={n})"
    return [Bound(bound_y, form), Bound(d_mu + 2 * u * mu.abs() + rounding[1], f"4·√n·u·mean|x| (n={n})"),
            Bound(rel_r * r + rounding[2], f"(2·√n·u·(1 + μ²r²) + 4u)·r (n={n})")]


def _attention(op: OpCall, inputs, exact, u: float, rounding) -> list[Bound | None]:
    """softmax(Q·Kᵀ·s + mask)·V: a contraction over d, a softmax over L, a contraction over L."""
    args, kwargs = bind_args(op, inputs)
    q, k, v = (t.double() for t in args[:3])
    d, length = q.shape[-1], k.shape[-2]
    scale = kwargs.get("scale") or 1 / math.sqrt(d)
    mask = args[3] if len(args) > 3 and isinstance(args[3], torch.Tensor) else kwargs.get("attn_mask")
    scores = q @ k.transpose(-2, -1) * scale
    if isinstance(mask, torch.Tensor):
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    if kwargs.get("is_causal") or (len(args) > 5 and args[5] is True):
        causal = torch.ones(q.shape[-2], length, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    spread = LAMBDA * math.sqrt(d) * u * (q.abs() @ k.abs().transpose(-2, -1) * abs(scale)).amax(-1, keepdim=True)
    mag = p @ v.abs()
    bound = (spread + (LAMBDA * math.sqrt(length) + 8) * u) * mag + 4 * u * exact[0].abs() + rounding[0]
    return [Bound(bound, f"(4·√d·u·max|q||k|·s + (4·√L + 8)·u)·P·|V| (d={d}, L={length})")] + \
        [None] * (len(exact) - 1)

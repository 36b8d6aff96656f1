"""Judging one op's outputs: metrics, the tolerance that applied, and the verdict rule.

Two rules (``--rule``): ``tolerance`` (default) — every element within
``atol + rtol·|expected|`` of the reference, as ``torch.testing.assert_close``;
``oracle`` — as PyTorch's accuracy minifier: the op is also run in float64 on
the same inputs, and the target passes if RMSE(target, fp64) ≤ k·RMSE(reference,
fp64) + atol/10, k = 2 (3 when the target computes in bf16). The fp64 numbers are
recorded for every float op either way, so a report can say how far the target
is from the truth compared with the reference itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tapml.core import OpCall, bind_args, flatten_outputs
from tapml.record import Metrics, Oracle

from .compare import compare_outputs, has_nonfinite, rmse, saturated
from .tolerance import Tolerance, ToleranceTable

__all__ = ["Judge", "RULES", "fp64_outputs"]

RULES = ("tolerance", "oracle")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _widen(value):
    if isinstance(value, torch.Tensor):
        return value.double() if value.dtype in _FLOATS else value
    if isinstance(value, torch.dtype):
        return torch.float64 if value in _FLOATS else value
    if isinstance(value, (list, tuple)):
        return type(value)(_widen(v) for v in value)
    if isinstance(value, dict):
        return {k: _widen(v) for k, v in value.items()}
    return value


def fp64_outputs(op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The op evaluated in float64 on the same inputs; None where PyTorch cannot."""
    try:
        args, kwargs = bind_args(op, [t.clone() if op.inplace else t for t in inputs])
        with torch.no_grad():
            return flatten_outputs(op.func(*_widen(args), **_widen(kwargs)))
    except Exception:
        return None


@dataclass
class Judge:
    table: ToleranceTable = field(default_factory=ToleranceTable)
    compute_dtype: str | None = None  # the dtype the target computes floats in, if not their own
    rule: str = "tolerance"

    def tolerance(self, op: OpCall) -> Tolerance:
        specs = op.output_specs
        dtype = next((s.dtype for s in specs if s.dtype.startswith(("float", "bfloat"))), None)
        if dtype is not None and self.compute_dtype:
            dtype = self.compute_dtype
        return self.table.resolve(op.op, op.module, dtype or (specs[0].dtype if specs else "float32"))

    def judge(self, op: OpCall, got: list[torch.Tensor], want: list[torch.Tensor],
              inputs: list[torch.Tensor] | None = None, *, oracle: bool = True) -> Metrics:
        """Metrics of ``got`` vs ``want``; ``inputs`` enable the NaN/Inf origin check and (with
        ``oracle``) the fp64 oracle."""
        tol = self.tolerance(op)
        m = compare_outputs(got, want, tol)
        m.saturated = sum(saturated(g, self.compute_dtype) for g in got)
        if inputs is not None:
            m.new_nonfinite = any(has_nonfinite(g) for g in got) and not any(has_nonfinite(t) for t in inputs)
            floats = [i for i, w in enumerate(want) if w.is_floating_point()]
            exact = fp64_outputs(op, inputs) if floats and oracle else None
            if exact is not None and len(exact) == len(want):
                i = floats[0]
                if got[i].shape == exact[i].shape:
                    r_t, r_r = rmse(got[i], exact[i]), rmse(want[i], exact[i])
                    k = 3.0 if self.compute_dtype == "bfloat16" else 2.0
                    m.oracle = Oracle(r_t, r_r, (r_t / r_r) if r_r else (0.0 if r_t == 0 else float("inf")),
                                      r_t <= k * r_r + tol.atol / 10)
        if self.rule == "oracle" and m.oracle is not None:
            m.ok = m.oracle.ok and m.problem is None
        if not m.ok:
            m.why = self._why(m, want)
        m.rule = self.rule if (self.rule == "tolerance" or m.oracle is not None) else "tolerance (no fp64 oracle)"
        return m

    def _why(self, m: Metrics, want: list[torch.Tensor]) -> str:
        """A one-line guess at the failure class, from the numbers."""
        if m.problem:
            return m.problem
        reduced = self.compute_dtype if self.compute_dtype in ("float16", "bfloat16") else None
        if m.new_nonfinite or (m.nan and m.nan[0] > m.nan[1]) or (m.inf and m.inf[0] > m.inf[1]):
            return ("overflow: inf/NaN appear that the reference does not have"
                    + (f" ({reduced} max is {torch.finfo(getattr(torch, reduced)).max:.4g})" if reduced else ""))
        if m.saturated:
            return f"saturation: {m.saturated} values at the {reduced} maximum"
        if reduced:
            scale = max((float(w.double().abs().nan_to_num(0, 0, 0).max()) for w in want if w.numel()), default=0.0)
            eps = torch.finfo(getattr(torch, reduced)).eps
            if scale and m.max_abs / scale <= 64 * eps:
                return (f"rounding to {reduced}: the error is {m.max_abs / scale / eps:.1f} {reduced} epsilons "
                        f"of the output's scale ({scale:.3g})")
            return f"precision loss beyond {reduced} rounding (error {m.max_abs:.3g} at scale {scale:.3g})"
        if m.oracle and m.oracle.ratio > 2:
            return f"{m.oracle.ratio:.3g}× farther from the fp64 result than the reference is"
        return "out of tolerance"

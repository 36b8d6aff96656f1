"""Judging one op's outputs: metrics, the rule that decides, and why it failed.

Three rules (``--rule``):

- ``bound`` (default): error analysis. Each output is compared with the op's exact
  (float64) result on the same inputs, against the error any correct implementation
  in the compute dtype may show (``bounds.py``: √K·u·|A|·|B| for contractions, a few
  ULPs for elementwise functions, ...). A different summation order passes; a narrow
  accumulator, a dropped term or a poor approximation does not. Where no bound is
  derived, the fp64 oracle below decides for that output. A target within twice the
  reference's own distance passes whatever the bound says.
- ``tolerance``: every element within ``atol + rtol·|expected|`` of the reference, as
  ``torch.testing.assert_close`` (the dtype's defaults, overridable per op and module).
- ``oracle``: as PyTorch's accuracy minifier: RMSE(target, fp64) ≤ k·RMSE(reference,
  fp64) + atol/10, k = 2 (3 for bfloat16).

Only *live* outputs decide: an output no later op reads and the model does not
return (layer norm's mean and rstd in inference) is reported as a dead-output
finding when wrong, never the reason an op fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tapml.core import OpCall, bind_args, flatten_outputs, make_room
from tapml.record import BoundCheck, DeadOutput, Metrics, Oracle

from .blocked import call_widened
from .bounds import op_bounds, op_class, unit_roundoff
from .compare import CHUNK, as_real, chunks, compare, has_nonfinite, output_label, rmse, saturated
from .tolerance import Tolerance, ToleranceTable

__all__ = ["Judge", "RULES", "fp64_outputs"]

RULES = ("bound", "tolerance", "oracle")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_REDUCED = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_DIVISIONS = {"div", "reciprocal", "rsqrt", "true_divide", "floor_divide", "remainder", "fmod"}
_LOGS = {"log", "log2", "log10", "log1p", "xlogy", "logit"}
_GATHERS = {"embedding"}  # copies rows: the same values whether widened before or after (a 4× smaller transient)


def _widen(value, rounded: torch.dtype | None = None):
    """Float tensors (and float dtype arguments) in float64 — first rounded to ``rounded`` if given."""
    if isinstance(value, torch.Tensor):
        if value.dtype in _FLOATS:
            return (value.to(rounded) if rounded is not None else value).double()
        return value
    if isinstance(value, torch.dtype):
        return torch.float64 if value in _FLOATS else value
    if isinstance(value, (list, tuple)):
        return type(value)(_widen(v, rounded) for v in value)
    if isinstance(value, dict):
        return {k: _widen(v, rounded) for k, v in value.items()}
    return value


def fp64_outputs(op: OpCall, inputs: list[torch.Tensor], rounded: torch.dtype | None = None
                 ) -> list[torch.Tensor] | None:
    """The op evaluated in float64 on the same inputs (first rounded to ``rounded``); None where PyTorch cannot."""
    try:
        args, kwargs = bind_args(op, [t.clone() if op.inplace else t for t in inputs])
        with torch.no_grad():
            if op.op.split(".")[1] in _GATHERS:  # exact in any dtype: widen the rows taken, not the whole table
                return [_widen(t, rounded) for t in flatten_outputs(op.func(*args, **kwargs))]
            return flatten_outputs(call_widened(op, args, kwargs, lambda v: _widen(v, rounded)))
    except Exception:
        return None


def _tf32(t: torch.Tensor, truncate: bool = False) -> torch.Tensor:
    """float32 values rounded to TF32 (10 mantissa bits, float32's range), as tensor cores take them
    (to nearest; ``truncate``: toward zero, as some conversions do)."""
    bits = t.float().contiguous().view(torch.int32)
    rounded = (bits if truncate else bits + 0x1000) & ~0x1FFF  # the 13 dropped bits
    return rounded.view(torch.float32)


def _like_tf32(op: OpCall, inputs: list[torch.Tensor], got: torch.Tensor, exact: torch.Tensor, output: int) -> bool:
    """Whether the op's exact result on TF32-rounded float32 operands (to nearest or truncated) explains
    the target's: a dropped term or a wrong scale can fit TF32's looser bound, but not this."""
    d_exact = rmse(got, exact)
    for truncate in (False, True):
        emulated = fp64_outputs(op, [_tf32(t, truncate) if t.dtype == torch.float32 else t for t in inputs])
        if emulated is not None and output < len(emulated) and emulated[output].shape == got.shape \
                and rmse(got, emulated[output]) < 0.25 * d_exact:
            return True
    return False


TF32_U = 2.0**-11  # TF32 keeps float32's exponent and 10 mantissa bits

_PRECISIONS = (("bfloat16", lambda t: t.to(torch.bfloat16)), ("float16", lambda t: t.to(torch.float16)),
               ("TF32", _tf32))


def consistent_with(op: OpCall, inputs: list[torch.Tensor], got: torch.Tensor, exact: torch.Tensor,
                    output: int = 0) -> str | None:
    """The reduced precision an error is consistent with: the op's exact result on operands rounded to
    that precision lands near the target's (TF32 matmuls, bfloat16 accumulation, ...)."""
    d_exact = rmse(got, exact)
    if not d_exact or not math.isfinite(d_exact):
        return None
    for name, rounding in _PRECISIONS:
        rounded = [rounding(t) if t.dtype in _FLOATS else t for t in inputs]  # widened by fp64_outputs, blocked
        emulated = fp64_outputs(op, rounded)
        if emulated is None or output >= len(emulated) or emulated[output].shape != got.shape:
            continue
        result = emulated[output] if name == "TF32" else rounding(emulated[output]).double()  # stored narrow too
        d = min(rmse(got, emulated[output]), rmse(got, result))
        if d < 0.25 * d_exact:
            return f"{name} operands (the exact result on {name}-rounded inputs is within {d:.2g} RMS of the " \
                   f"target's, against {d_exact:.2g} from the true result)"
    return None


@dataclass
class Judge:
    table: ToleranceTable = field(default_factory=ToleranceTable)
    compute_dtype: str | None = None  # the dtype the target computes floats in, if not their own
    rule: str = "bound"
    _tolerances: dict = field(default_factory=dict, repr=False, compare=False)

    def tolerance(self, op: OpCall) -> Tolerance:
        """The op's tolerance, memoized per op object (a store hands out one per carved op; the table and
        the compute dtype are set before judging starts)."""
        hit = self._tolerances.get(id(op))
        if hit is not None and hit[0] is op:
            return hit[1]
        make_room(self._tolerances, 1 << 12)  # (it holds the op: no more than the store keeps parsed)
        tol = self._tolerance(op)
        self._tolerances[id(op)] = (op, tol)
        return tol

    def _tolerance(self, op: OpCall) -> Tolerance:
        specs = op.output_specs
        dtype = next((s.dtype for s in specs if s.dtype.startswith(("float", "bfloat"))), None)
        if dtype is not None and self.compute_dtype:
            dtype = self.compute_dtype
        return self.table.resolve(op.op, op.module, dtype or (specs[0].dtype if specs else "float32"))

    def judge(self, op: OpCall, got: list[torch.Tensor], want: list[torch.Tensor],
              inputs: list[torch.Tensor] | None = None, *, oracle: bool = True, live: list[bool] | None = None,
              full: bool = False) -> Metrics:
        """Metrics of ``got`` vs ``want``. ``inputs`` (with ``oracle``) enable the exact result, the bound
        and the NaN/Inf origin check; ``live`` marks the outputs that decide (default: all)."""
        tol = self.tolerance(op)
        if len(got) != len(want):
            return Metrics(ok=False, tolerance=tol, problem_kind="count", max_abs=None,
                           problem=f"{len(got)} outputs ≠ expected {len(want)}", rule=self.rule)
        names = op.info.outputs if op.info.outputs else ()
        per = [compare(g, w, tol, full=full, label=output_label(k, names[k] if k < len(names) else "", len(want)))
               for k, (g, w) in enumerate(zip(got, want, strict=True))]
        if inputs is not None and oracle:
            self._against_exact(op, got, want, inputs, per)
        live = live if live is not None and len(live) == len(want) else [True] * len(want)
        deciding = [k for k in range(len(want)) if live[k]] or list(range(len(want)))
        if not want:
            return Metrics(ok=True, tolerance=tol, rule=self.rule)
        k = max(deciding, key=lambda i: (not per[i].ok, _badness(per[i])))
        m = per[k]
        if not m.ok and not full and m.problem_kind is None:  # out of bounds: the full metric set explains it
            full_m = compare(got[k], want[k], tol, full=True, label=output_label(k, "", len(want)))
            for name in ("max_rel", "cosine", "sqnr_db", "max_ulp", "worst", "histogram"):
                setattr(m, name, getattr(full_m, name))
        m.ok = all(per[i].ok for i in deciding)
        if len(want) > 1:
            m.output, m.outputs = k, len(want)
            m.output_name = names[k] if k < len(names) and names[k] else None
        m.dead = [DeadOutput(i, per[i].problem or _short(per[i]), names[i] if i < len(names) else "")
                  for i in range(len(want)) if not live[i] and not per[i].ok]
        m.saturated = sum(saturated(g, self.compute_dtype) for g in got) or None
        if inputs is not None:  # a NaN/Inf born here: where the reference is finite, from finite inputs
            m.new_nonfinite = any(p.nonfinite_mismatches for p in per) and not any(has_nonfinite(t) for t in inputs)
        if not m.ok:
            m.why = self._why(op, m, want, inputs)
        m.rule = self.rule
        return m

    def _against_exact(self, op: OpCall, got, want, inputs, per: list[Metrics]) -> None:
        """Bound (and oracle) checks of every float output against the op's exact result."""
        floats = [i for i, w in enumerate(want) if w.is_floating_point() or w.is_complex()]
        if not floats:
            return
        reduced = _REDUCED.get(self.compute_dtype or "")
        exact = fp64_outputs(op, inputs)
        exact_t = fp64_outputs(op, inputs, reduced) if reduced is not None else exact
        if exact is None or exact_t is None or len(exact) != len(want):
            return
        u = unit_roundoff(self.compute_dtype or next((str(want[i].dtype)[6:] for i in floats), "float32"))
        dtypes = [reduced if reduced is not None and w.is_floating_point() else w.dtype for w in want]  # ULPs there
        bounds = op_bounds(op, inputs, exact_t, u, dtypes) if not any(e.is_complex() for e in exact) \
            else [None] * len(want)
        k_oracle = 3.0 if self.compute_dtype == "bfloat16" else 2.0
        for i in floats:
            g, w, e, et = got[i], want[i], exact[i], exact_t[i]
            if per[i].problem_kind is not None or g.shape != e.shape:
                continue
            r_t, r_r = rmse(_real(g), _real(e)), rmse(_real(w), _real(e))  # the minifier's: both against fp64
            tol = per[i].tolerance
            per[i].oracle = Oracle(r_t, r_r, (r_t / r_r) if r_r else (0.0 if r_t == 0 else math.inf),
                                   r_t <= k_oracle * r_r + tol.atol / 10)
            b = bounds[i] if i < len(bounds) else None
            if b is not None:
                ratio_t, ratio_r = _ratio(g, w, et, b.tensor), _ratio(w, w, e, b.tensor)
                per[i].bound = BoundCheck(b.form, ratio_t, ratio_r, i)
                passed = ratio_t <= max(1.0, 2 * ratio_r)
            else:
                per[i].bound = BoundCheck("fp64 oracle (no bound for this op): RMSE to fp64 ≤ "
                                          f"{k_oracle:g}× the reference's", r_t / max(k_oracle * r_r + tol.atol / 10,
                                                                                     1e-300), 0.0, i)
                passed = per[i].oracle.ok
            if self.rule == "bound":
                per[i].ok = passed and not per[i].problem
            elif self.rule == "oracle":
                per[i].ok = per[i].oracle.ok and not per[i].problem
            if not passed and b is not None and op_class(op.op) in ("contraction", "attention"):
                self._precision(op, inputs, g, w, e, exact_t, dtypes, i, per[i].bound)

    def _precision(self, op: OpCall, inputs, g, w, e, exact_t, dtypes, i: int, check: BoundCheck) -> None:
        """Name the arithmetic an out-of-bounds float32 contraction's error is consistent with: within the
        same bound for TF32's unit roundoff (10 mantissa bits, u = 2^-11), and explained by TF32-rounded
        operands, is a TF32 matmul (``torch.backends.cuda.matmul.allow_tf32``), not a bug; else operands
        rounded to bfloat16/float16."""
        if (self.compute_dtype or "float32") == "float32" and w.dtype == torch.float32:
            loose = op_bounds(op, inputs, exact_t, TF32_U, dtypes)
            b = loose[i] if i < len(loose) else None
            ratio = _ratio(g, w, exact_t[i], b.tensor) if b is not None else math.inf
            if ratio <= 1.0 and _like_tf32(op, inputs, g, e, i):
                check.precision = "tf32"
                check.consistent_with = (f"TF32 matmul: beyond the float32 bound (u = 2^-24) but within the TF32 "
                                         f"one (u = 2^-11: {ratio:.2g}× it)")
                return
        check.consistent_with = consistent_with(op, inputs, g, e, i)
        if check.consistent_with:
            check.precision = check.consistent_with.split(" ")[0].lower()

    def _why(self, op: OpCall, m: Metrics, want: list[torch.Tensor], inputs) -> str:
        """A one-line reading of the failure class, from the numbers and the op."""
        if m.problem:
            return m.problem
        name = op.op.split(".")[1]
        reduced = self.compute_dtype if self.compute_dtype in _REDUCED else None
        label = output_label(m.output or 0, m.output_name or "", m.outputs or 1)
        if m.nonfinite_mismatches:
            zeros = inputs is not None and any(t.is_floating_point() and t.numel() and bool((t == 0).any())
                                               for t in inputs)
            if name in _DIVISIONS and zeros:
                return f"{label}: division by zero (1/0, rsqrt(0)) gives inf/NaN where the reference is finite"
            if name in _LOGS and inputs is not None and any(
                    t.is_floating_point() and t.numel() and bool((t <= 0).any()) for t in inputs):
                return f"{label}: log of a non-positive value gives inf/NaN where the reference is finite"
            limit = f" ({reduced} max is {torch.finfo(_REDUCED[reduced]).max:.4g})" if reduced else ""
            return f"{label}: overflow: inf/NaN where the reference is finite{limit}"
        if m.saturated:
            return f"{label}: saturation: {m.saturated} values at the {reduced} maximum"
        b = m.bound
        if b is not None and self.rule == "bound":
            text = (f"{label}: {b.ratio:.3g}× beyond the error a correct implementation may show ({b.form}); "
                    f"the reference is at {b.reference_ratio:.2g}×")
            return text + (f" — consistent with {b.consistent_with}" if b.consistent_with else "")
        if reduced:
            scale = max((float(w.double().abs().nan_to_num(0, 0, 0).max()) for w in want
                         if w.numel() and w.is_floating_point()), default=0.0)
            eps = torch.finfo(_REDUCED[reduced]).eps
            if scale and (m.max_abs or 0) / scale <= 64 * eps:
                return (f"{label}: rounding to {reduced}: the error is {m.max_abs / scale / eps:.1f} {reduced} "
                        f"epsilons of the output's scale ({scale:.3g})")
            return f"{label}: precision loss beyond {reduced} rounding (error {m.max_abs:.3g} at scale {scale:.3g})"
        if b is not None and b.ratio <= max(1.0, 2 * b.reference_ratio):
            return (f"{label}: summation order — within the error a correct implementation may show "
                    f"({b.ratio:.2g}× the bound, reference {b.reference_ratio:.2g}×): not a bug, but out of "
                    "the assert_close tolerance")
        if m.oracle and m.oracle.ratio > 2:
            return f"{label}: {m.oracle.ratio:.3g}× farther from the fp64 result than the reference is"
        return f"{label}: out of tolerance"


def _real(t: torch.Tensor) -> torch.Tensor:
    return as_real(t) if t.is_complex() else t


def _ratio(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> float:
    """max |got − exact| / bound; a non-finite value where the reference has another is infinitely out (a
    large output ``CHUNK`` elements at a time: its float64 temporaries would be several copies of it)."""
    if not got.numel():
        return 0.0
    got, want, exact = _real(got), _real(want), _real(exact)
    bound = bound if not bound.is_complex() else as_real(bound)
    if got.numel() <= CHUNK:
        return _ratio_of(got, want, exact, bound)
    ratios = [_ratio_of(*part) for part in chunks(got, want, exact, bound)]
    return math.nan if any(math.isnan(r) for r in ratios) else max(ratios)  # NaN wins, as in torch's max


def _ratio_of(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> float:
    g, w, e = got.double(), want.double(), exact.double()
    b = bound.double()
    both = (g == w) & ~torch.isfinite(g)  # the same inf on both sides: inherent, not the target's
    err = (g - e).abs().masked_fill(both, 0.0).nan_to_num(nan=math.inf, posinf=math.inf)
    b = b.expand_as(err) if b.shape != err.shape else b
    r = torch.where(err == 0, torch.zeros_like(err), err / b.clamp(min=1e-300))
    return float(r.max())


def _badness(m: Metrics) -> float:
    if m.problem_kind is not None:
        return math.inf
    if m.bound is not None:
        return m.bound.ratio
    return m.max_abs or 0.0


def _short(m: Metrics) -> str:
    return f"max abs {m.max_abs:.3g}" if m.max_abs is not None else "differs"

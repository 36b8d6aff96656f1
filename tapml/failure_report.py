"""The numeric report of a carved op that failed on a target: what differed, by how much, against which limit.

One text for every front end that judges a single op (the pytest plugin's items,
emitted tests): where the op is, its inputs, mismatch count, max abs/rel, cosine,
SQNR, ULP, NaN/Inf, the bound and the tolerance with their origins, and the worst
elements as a table ``index | expected | got | diff | allowed``.
"""

from __future__ import annotations

import math

from .carving import FixtureStore
from .record import Metrics
from .reports import fmt as num

__all__ = ["where", "mismatch_report"]


def where(store: FixtureStore, index: int, platform: str) -> str:
    """The op, its module, call and source line, the target, and its inputs' dtypes and shapes."""
    rec, op = store.ops[index], store.op_call(index)
    shapes = ", ".join(f"{s.dtype}{list(s.shape)}" for s in op.inputs)
    return (f"{rec['op']} in {rec['module'] or '(model)'} (call {rec['call']}, {rec['source']}) "
            f"on {platform}\ninputs: {shapes}")


def mismatch_report(m: Metrics, head: str, extra: list[str] = ()) -> str:
    """``head`` (``where(...)``), the metrics, the limits and the worst elements, then ``extra`` lines."""
    tol = m.tolerance
    lines = [head,
             f"outputs: {m.dtype}{m.shape}; {m.mismatches if m.mismatches is not None else '?'} of "
             f"{math.prod(m.shape or [])} elements ({100 * (m.mismatch_fraction or 0):.2f}%) out of tolerance",
             f"max abs {num(m.max_abs)}, max rel {num(m.max_rel)}, cosine {num(m.cosine)}, "
             f"SQNR {num(m.sqnr_db)} dB, max ULP {num(m.max_ulp)}, NaN {m.nan}, Inf {m.inf}"]
    if m.bound is not None:
        lines.append(f"bound: {num(m.bound.ratio)}× the error a correct implementation may show ({m.bound.form}); "
                     f"the reference is at {num(m.bound.reference_ratio)}× (rule: {m.rule})")
    lines.append(f"tolerance: atol {num(tol.atol)}, rtol {num(tol.rtol)} — from {tol.origin}")
    if m.why:
        lines.append(f"why: {m.why}")
    lines.append(f"{'index':>16} | {'expected':>12} | {'got':>12} | {'diff':>10} | {'allowed':>10}")
    for w in m.worst:
        exp = w.expected
        allowed = tol.atol + tol.rtol * abs(exp) if isinstance(exp, (int, float)) else float("nan")
        lines.append(f"{str(w.index):>16} | {num(exp):>12} | {num(w.got):>12} | {num(w.diff):>10} | "
                     f"{num(allowed):>10}")
    return "\n".join(lines + list(extra))

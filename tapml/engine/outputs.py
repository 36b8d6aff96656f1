"""Judging a model's (or a unit's) outputs as a whole: against the reference run, and under the bound
rule against the float64 run — what any correct implementation that rounds differently achieves."""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_leaves

from tapml.core import dtype_name
from tapml.judging import Judge, compare, output_label, rmse, unit_roundoff
from tapml.record import BoundCheck, Metrics, Oracle

__all__ = ["E2E_FACTOR", "end_to_end"]

# the end-to-end rule: the target's distance from the float64 run within this many times the reference's own
E2E_FACTOR = 4.0


def _leaves(output) -> list[torch.Tensor]:
    """The output's tensors on the CPU (a CUDA reference's, a saved reference's and the float64 run's meet there)."""
    return [t.cpu() for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def end_to_end(got, want, judge: Judge, excluded: dict[int, str] | None = None,
               exact: list[torch.Tensor | None] | None = None) -> Metrics:
    """The model's outputs in a mixed run against the reference run's (the worst output); ``excluded``
    outputs (uninitialized memory) are not compared. Under the bound and oracle rules, a float output
    passes when its distance from the float64 run (``exact``) is within ``E2E_FACTOR`` times the
    reference's own — what any correct implementation that rounds differently achieves."""
    got, want = _leaves(got), _leaves(want)
    if len(got) != len(want):
        return Metrics(ok=False, problem_kind="count", problem=f"{len(got)} model outputs ≠ expected {len(want)}",
                       max_abs=None)
    worst = None
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if excluded and i in excluded:
            continue
        dtype = judge.compute_dtype if (w.is_floating_point() and judge.compute_dtype) else dtype_name(w.dtype)
        m = compare(g, w, judge.table.resolve("(model output)", "", dtype), full=False,
                    label=output_label(i, "", len(want)))
        e = exact[i] if exact is not None and i < len(exact) else None
        if judge.rule != "tolerance" and e is not None and w.is_floating_point() and m.problem_kind is None \
                and e.shape == g.shape:
            _against_float64(m, g, w, e, judge.compute_dtype)
        m.output = i
        if worst is None or (not m.ok, _size(m)) > (not worst.ok, _size(worst)):
            worst = m
    return worst or Metrics(ok=True, max_abs=0.0)


def _size(m: Metrics) -> float:
    return m.bound.ratio if m.bound is not None else (m.max_abs if m.max_abs is not None else math.inf)


def _against_float64(m: Metrics, g: torch.Tensor, w: torch.Tensor, e: torch.Tensor,
                     compute_dtype: str | None = None) -> None:
    """The floor's unit roundoff is the coarser of the output's dtype and the target's compute dtype: a
    bfloat16 target on a float32 model rounds every op to 2⁻⁸, as the per-op bounds already allow."""
    r_t, r_r = rmse(g, e), rmse(w, e)
    u = max(unit_roundoff(dtype_name(w.dtype)), unit_roundoff(compute_dtype) if compute_dtype else 0.0)
    floor = 4 * u * math.sqrt(float((e.double() ** 2).mean())) if e.numel() else 0.0
    allowed = E2E_FACTOR * r_r + floor
    m.oracle = Oracle(r_t, r_r, (r_t / r_r) if r_r else (0.0 if r_t == 0 else math.inf), r_t <= allowed)
    m.bound = BoundCheck(f"RMSE to the float64 run ≤ {E2E_FACTOR:g}× the reference's + 4u·rms",
                         r_t / allowed if allowed else (0.0 if r_t == 0 else math.inf),
                         r_r / allowed if allowed else 0.0)
    m.ok = m.oracle.ok and m.problem is None

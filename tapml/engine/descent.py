"""Localizing inside units, top-down: model → module → child module → op → fused kernel.

A unit is judged on its carved inputs against the float64 run of the same program
(the end-to-end rule: the target's RMSE to float64 within 4× the reference's own,
plus 4u·rms). One out of bounds is *descended*: its child modules (as units, each
on its carved inputs) and its loose ops are checked in call order and the first
out of bounds is descended in turn. An op at the bottom is an op culprit; a unit
whose every part is fine alone is a **graph-level** defect of the compiler (fusion,
layout); when the target can show the kernels inside (``trace_unit``), the first
fused kernel whose output departs from its matched carved tensor is named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tapml.carving import FixtureStore
from tapml.core import OpFailed, Status, TapmlError, UnitCall
from tapml.judging import Judge
from tapml.platforms import Target, Unsupported, run_program
from tapml.record import Metrics

from .kernels import first_bad_kernel
from .localize import LocalResult, skip_reason
from .outputs import end_to_end
from .units import Units, UnitSpan, carved_outputs, children_of, unit_inputs

__all__ = ["UnitCulprit", "check_unit", "judge_unit", "localize_units"]


@dataclass
class UnitCulprit:
    """Where the descent ended."""

    level: str  # op | unit | kernel
    layer: int  # the unit it ended in (the op's or kernel's enclosing unit)
    local: Metrics
    descent: list[str] = field(default_factory=list)
    op: int | None = None  # level op: the op index
    kernel: str | None = None
    covers: list[str] = field(default_factory=list)


def judge_unit(target: Target, judge: Judge, unit: UnitCall, inputs: list[torch.Tensor],
               want: list[torch.Tensor]) -> tuple[Metrics, list[torch.Tensor]]:
    """The unit on ``inputs`` against the reference's ``want`` (and, under the bound rule, the float64 run
    of the same program): its metrics and the target's outputs. Raises ``Unsupported`` or ``OpFailed``."""
    got = target.execute_unit(unit, inputs)
    exact = None
    if judge.rule != "tolerance":
        exact = run_program(unit, inputs, compute=torch.float64)  # every node widens its float inputs
    return end_to_end(got, want, judge, None, exact), got


def check_unit(store: FixtureStore, target: Target, judge: Judge, unit: UnitCall, span: UnitSpan) -> Metrics | str:
    """The unit alone on its carved inputs: metrics (against float64 under the bound rule), or why it did not run."""
    try:
        return judge_unit(target, judge, unit, unit_inputs(store, unit), carved_outputs(store, span))[0]
    except (Unsupported, OpFailed) as e:
        return f"{type(e).__name__}: {e}"


def _ratio(m: Metrics) -> str:
    if m.bound is not None:
        return f"{m.bound.ratio:.3g}× its bound"
    return m.problem or (f"max abs {m.max_abs:.3g}" if m.max_abs is not None else "?")


class _Descent:
    def __init__(self, store: FixtureStore, units: Units, target: Target, judge: Judge,
                 run_op: Callable[[int], LocalResult], checked: dict[int, Metrics | str]):
        self.store, self.units, self.target, self.judge, self.run_op = store, units, target, judge, run_op
        self.checked = checked

    def unit_metrics(self, layer: int) -> Metrics | str | None:
        """A child as a unit (checked once), or None when it is not a unit or does not compile."""
        if layer not in self.checked:
            made = self.units.get(layer)
            if isinstance(made, str) or not self.target.prepare_unit(made[0]):
                return None
            self.checked[layer] = check_unit(self.store, self.target, self.judge, *made)
        return self.checked[layer]

    def parts(self, layer: int) -> list[tuple[str, int]]:
        """A unit's parts in call order: ("unit", layer) for children that compile, ("op", i) for the rest."""
        kids, loose = children_of(self.store, layer)
        parts = [("op", i) for i in loose if skip_reason(self.store.ops[i]) is None]
        for k in kids:
            if self.unit_metrics(k) is not None:
                parts.append(("unit", k))
            else:
                parts.extend(self.parts(k))
        return sorted(parts, key=lambda p: p[1] if p[0] == "op" else self.store.layers[p[1]]["ops"][0])

    def down(self, layer: int, metrics: Metrics, path: list[str]) -> UnitCulprit | None:
        """Where inside ``layer`` (out of bounds) the error starts; None when a unit that is one op stays
        within that op's own bound (the unit rule's alarm was a rounding the op's bound allows)."""
        rec = self.store.layers[layer]
        path = path + [f"{rec['module'] or '(model)'} ({rec['class']}): {_ratio(metrics)}"]
        parts = self.parts(layer)
        excused = False  # a child out of the unit rule but within its one op's bound explains this one too
        for kind, x in parts:
            if kind == "unit":
                m = self.checked[x]
                found = self.down(x, m, path) if isinstance(m, Metrics) and not m.ok else None
                if found is not None:
                    return found
                excused = excused or (isinstance(m, Metrics) and not m.ok)
            else:
                r = self.run_op(x)
                if r.status == Status.DIVERGENT and r.local is not None:
                    op = self.store.ops[x]
                    return UnitCulprit("op", layer, r.local, path + [f"{op['op']} (op {x}): {_ratio(r.local)}"], op=x)
        if len(parts) == 1 and parts[0][0] == "op":
            as_op = self.as_op(layer, parts[0][1])
            excused = as_op is not None and as_op.ok
        return None if excused else self.graph_level(layer, metrics, path)

    def as_op(self, layer: int, index: int) -> Metrics | None:
        """A unit that computes one op (plus views), its outputs judged by that op's own bound; None when
        its outputs do not map one to one onto the op's."""
        unit, span = self.units.built[layer]
        want = self.store.outputs(index)
        try:
            got = self.target.execute_unit(unit, unit_inputs(self.store, unit))
        except (Unsupported, OpFailed):
            return None
        if len(got) != len(want) or any(g.numel() != w.numel() for g, w in zip(got, want, strict=True)):
            return None
        got = [g.reshape(w.shape) for g, w in zip(got, want, strict=True)]
        return self.judge.judge(self.store.op_call(index), got, want, self.store.inputs(index))

    def graph_level(self, layer: int, metrics: Metrics, path: list[str]) -> UnitCulprit:
        """Every part is fine alone: the unit compiled whole is wrong. Name the fused kernel when possible."""
        culprit = UnitCulprit("unit", layer, metrics, path + ["every part is within bounds alone: graph-level"])
        unit, span = self.units.built[layer]
        try:
            found = first_bad_kernel(self.store, self.target, self.judge, unit, span)
        except (Unsupported, OpFailed, TapmlError):
            return culprit
        if found is not None:
            name, covers, m = found
            culprit.level, culprit.kernel, culprit.covers = "kernel", name, covers
            culprit.descent[-1] = f"fused kernel {name} ({', '.join(covers[:6])}): {_ratio(m)}"
            culprit.local = m
        return culprit


def localize_units(store: FixtureStore, units: Units, target: Target, judge: Judge, executed: list[int],
                   propagated: dict[int, Metrics | None], run_op: Callable[[int], LocalResult]
                   ) -> tuple[dict[int, Metrics | str], UnitCulprit | None]:
    """Each executed unit alone (the first of each signature, and every one that went wrong live), then
    the descent from the first out of bounds. Returns every unit checked and where the descent ended."""
    checked: dict[int, Metrics | str] = {}
    seen: set[str] = set()
    for layer in executed:
        unit, span = units.built[layer]
        live = propagated.get(layer)
        if unit.signature in seen and (live is None or live.ok):
            continue
        seen.add(unit.signature)
        checked[layer] = check_unit(store, target, judge, unit, span)
    descent = _Descent(store, units, target, judge, run_op, checked)
    for layer in executed:  # the first unit out of bounds whose descent ends somewhere
        m = checked.get(layer)
        found = descent.down(layer, m, []) if isinstance(m, Metrics) and not m.ok else None
        if found is not None:
            return checked, found
    return checked, None

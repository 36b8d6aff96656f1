"""A top-down run's units as a tree (model → module → child module), each with its status and errors,
and the descent that found the culprit.

Why from the record alone: ``Run.units`` rows carry their parent module call, so the
tree is the rows indented by ancestry; the descent is ``Culprit.descent``, whose unit
steps read ``MODULE (CLASS): …`` — a row is on the path when its module and class
open one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tapml.record import Metrics, Run, UnitRow

from .run import number

__all__ = ["UnitLine", "unit_lines", "unit_error", "on_descent", "LEVELS"]

# what each culprit level means, as the report and the terminal say it
LEVELS = {
    "op": "an op, alone on its carved inputs",
    "unit": "a compiled unit (graph-level: every child module and op is within bounds alone)",
    "kernel": "a fused kernel inside a compiled unit",
}


@dataclass
class UnitLine:
    """One row of the units tree."""

    row: UnitRow
    depth: int
    descent: bool  # on the path the descent followed
    culprit: bool  # the unit the descent ended in
    measured: UnitRow | None = None  # a later call of a signature: the first call, whose local error stands for it


def unit_error(m: Metrics | None, rule: str) -> str:
    """A unit's error as the tree shows it: × its bound (the bound rule), else max abs; or its problem."""
    if m is None:
        return ""
    if m.problem:
        return m.problem
    if rule != "tolerance" and m.bound is not None:
        r = number(m.bound.ratio)
        return f"{r:.3g}× bound"
    x = number(m.max_abs)
    return "" if x is None else f"max abs {x:.3g}"


def _label(row: UnitRow) -> str:
    return f"{row.module or '(model)'} ({row.cls})"


def on_descent(row: UnitRow, descent: list[str]) -> bool:
    head = _label(row) + ":"
    return any(step.startswith(head) for step in descent)


def unit_lines(record: Run) -> list[UnitLine]:
    """The rows in call order (parents before children), each with its depth and descent marks."""
    rows = sorted(record.units, key=lambda r: (r.ops[0], -r.ops[1], r.layer))
    by_layer = {r.layer: r for r in rows}
    culprit = record.culprit
    descent = culprit.descent if culprit is not None else []
    depth: dict[int, int] = {}

    def depth_of(row: UnitRow) -> int:
        if row.layer not in depth:
            parent = by_layer.get(row.parent) if row.parent is not None else None
            depth[row.layer] = 0 if parent is None or parent is row else depth_of(parent) + 1
        return depth[row.layer]

    first: dict[str, UnitRow] = {}
    for r in rows:
        if r.local is not None and r.signature:
            first.setdefault(r.signature, r)
    lines = [UnitLine(r, depth_of(r), on_descent(r, descent), False,
                      first.get(r.signature) if r.local is None and r.signature else None) for r in rows]
    if culprit is not None and culprit.level != "op":
        end = next((ln for ln in reversed(lines) if ln.descent and ln.row.module == culprit.unit), None)
        if end is not None:
            end.culprit = True
    elif culprit is not None:  # an op culprit: the deepest unit on the path holds it
        end = next((ln for ln in reversed(lines) if ln.descent), None)
        if end is not None:
            end.culprit = True
    return lines

"""The ``top-down`` plan: the largest module calls that compile run on the target as units.

It starts from the model's repeated blocks (``find_blocks``, or ``--layers``) and the
outermost module calls around them; a call that is not a program (``build_unit``'s
reason) or that the target will not compile *falls back* to its children, recursively,
down to single ops. Units feed each other along the carved data flow: units with no
path between them (parallel branches) share a DAG level and migrate in one step;
steps are cumulative, as in ``layers``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tapml.carving import FixtureStore
from tapml.core import Status
from tapml.judging import Judge
from tapml.platforms import Target
from tapml.record import UnitRow

from .descent import UnitCulprit, localize_units
from .localize import Localization, LocalResult, run_local
from .plans import find_blocks
from .reference import Reference
from .steps import StepsOutcome
from .units import Units, children_of

__all__ = ["TopDown", "TopDownResult", "plan_top_down", "top_down_steps", "localize_top_down", "unit_name"]


@dataclass
class TopDown:
    """Which module calls run as units, which ops run alone, and every call considered on the way."""

    units: Units
    frontier: list[int] = field(default_factory=list)  # layers compiled and run as units, in call order
    loose: list[int] = field(default_factory=list)  # op indices in no unit
    rows: dict[int, UnitRow] = field(default_factory=dict)  # by layer
    levels: dict[int, int] = field(default_factory=dict)  # layer -> DAG level (1 = reads no other unit)
    edges: set[tuple[int, int]] = field(default_factory=set)  # (producer layer, consumer layer)
    loose_level: dict[int, int] = field(default_factory=dict)

    def edge_names(self, store: FixtureStore) -> list[list[str]]:
        """The DAG's edges by module path, for the run record."""
        return sorted([unit_name(store, a), unit_name(store, b)] for a, b in self.edges)


def unit_name(store: FixtureStore, layer: int) -> str:
    """A module call by path, with its call number when the module runs more than once."""
    rec = store.layers[layer]
    return (rec["module"] or "(model)") + (f" (call {rec['call']})" if rec["call"] else "")


def _row(store: FixtureStore, layer: int, status: str, reason: str | None = None) -> UnitRow:
    rec = store.layers[layer]
    return UnitRow(layer=layer, module=rec["module"], cls=rec["class"], call=rec["call"], ops=list(rec["ops"]),
                   status=status, parent=rec.get("parent"), reason=reason)


def plan_top_down(store: FixtureStore, target: Target, layers: str | None = None,
                  on_compile: Callable[[str], None] | None = None) -> TopDown:
    """Choose the units (compiling each unique one on ``target``) and their DAG."""
    td = TopDown(Units(store))
    blocks = set(find_blocks(store, layers))
    ranges = [tuple(r["ops"]) for r in store.layers if r["module"] in blocks]

    def holds_block(layer: int) -> bool:
        a, b = store.layers[layer]["ops"]
        return any(a <= x and y <= b and (x, y) != (a, b) for x, y in ranges)

    def try_unit(layer: int) -> None:
        rec = store.layers[layer]
        if blocks and holds_block(layer) and rec["module"] not in blocks:
            td.rows[layer] = _row(store, layer, "fell back", "holds the repeated blocks: they are the units")
            return descend(layer)
        made = td.units.get(layer)
        if isinstance(made, str):
            td.rows[layer] = _row(store, layer, "not a unit", made)
            return descend(layer)
        unit, _ = made
        if on_compile is not None:
            on_compile(rec["module"] or "(model)")
        start = time.perf_counter()
        support = target.prepare_unit(unit)
        row = td.rows[layer] = _row(store, layer, "compiled" if support else "fell back", support.reason or None)
        row.signature, row.nodes, row.compile_s = unit.signature, len(unit.nodes), time.perf_counter() - start
        if support:
            td.frontier.append(layer)
        else:
            descend(layer)

    def descend(layer: int) -> None:
        kids, loose = children_of(store, layer)
        for k in kids:
            try_unit(k)
        td.loose.extend(loose)

    covered: set[int] = set()
    for rec in store.layers:
        if rec.get("parent") is None and rec["ops"][1] > rec["ops"][0]:
            try_unit(rec["index"])
            covered.update(range(*rec["ops"]))
    td.loose.extend(i for i in range(len(store.ops)) if i not in covered)
    td.loose.sort()
    td.frontier.sort(key=lambda layer: store.layers[layer]["ops"][0])
    _levels(store, td)
    return td


def _levels(store: FixtureStore, td: TopDown) -> None:
    """Each unit's DAG level along the carved data flow (loose ops pass levels on, adding none)."""
    owner = {i: layer for layer in td.frontier for i in range(*store.layers[layer]["ops"])}
    level: dict[int, int] = {}  # op -> the level of what it produces
    near: dict[int, set[int]] = {}  # op -> the nearest units upstream of what it produces
    flow = store.graph.flow
    for i in range(len(store.ops)):
        layer = owner.get(i)
        if layer is not None and i != store.layers[layer]["ops"][0]:
            level[i], near[i] = td.levels[layer], {layer}
            continue
        reads = flow.get(i, {}).values() if layer is None else \
            [s for j in range(*store.layers[layer]["ops"]) for s in flow.get(j, {}).values()
             if s[0] < store.layers[layer]["ops"][0]]
        lev = max((level.get(s[0], 0) for s in reads), default=0)
        ups = set().union(*(near.get(s[0], set()) for s in reads)) if reads else set()
        if layer is None:
            level[i], near[i] = lev, ups
            td.loose_level[i] = lev
        else:
            td.levels[layer] = level[i] = lev + 1
            near[i] = {layer}
            td.edges.update((u, layer) for u in ups)


def top_down_steps(store: FixtureStore, td: TopDown) -> list[dict]:
    """Cumulative steps, one per DAG level: ``{"name", "groups", "offload", "units"}``."""
    levels = sorted(set(td.levels.values()))
    if not levels:
        return [{"name": "ops outside any unit", "groups": [], "offload": list(td.loose), "units": []}]
    steps, units, ops = [], [], []
    for k, lev in enumerate(levels):
        these = [layer for layer in td.frontier if td.levels[layer] == lev]
        later = k + 1 < len(levels)
        loose = [i for i in td.loose if (td.loose_level[i] < lev if later else True)
                 and (k == 0 or td.loose_level[i] >= levels[k - 1])]
        units, ops = units + these, ops + loose
        names = [unit_name(store, layer) for layer in these]
        name = "+ " + (", ".join(names) if len(names) <= 3 else f"{len(names)} units: {names[0]} … {names[-1]}")
        steps.append({"name": name, "groups": names, "offload": list(ops),
                      "units": [td.units.built[layer] for layer in units]})
    return steps


def localize_top_down(store: FixtureStore, td: TopDown, target: Target, judge: Judge, outcome: StepsOutcome,
                      loc: Localization, reference: Reference) -> TopDownResult:
    """Each executed unit alone, the descent from the first out of bounds, and the unit rows."""
    executed = [layer for layer in td.frontier
                if layer in outcome.units and outcome.units[layer].status == Status.OFFLOADED]

    def run_op(i: int) -> LocalResult:
        if i not in loc.results:
            loc.results[i] = run_local(store, target, judge, i, reference=reference)
        return loc.results[i]

    live = {layer: r.propagated for layer, r in outcome.units.items()}
    checked, culprit = localize_units(store, td.units, target, judge, executed, live, run_op)
    rows = dict(td.rows)
    for layer, m in checked.items():
        row = rows.get(layer)
        if row is None:
            made = td.units.built[layer][0]
            row = rows[layer] = _row(store, layer, "checked", "checked alone while localizing")
            row.signature, row.nodes = made.signature, len(made.nodes)
        if isinstance(m, str):
            row.reason = f"did not run alone: {m}"
        else:
            row.local = m
    for layer, r in outcome.units.items():
        row = rows[layer]
        row.propagated, row.run_ms, row.step = r.propagated, r.target_ms, outcome.unit_step.get(layer)
        row.round_trips = 1
        if r.status != Status.OFFLOADED:
            row.status, row.reason = "failed", f"{r.status}: {r.reason}"
    inside = {i: store.layers[layer]["module"] or "(model)" for layer in executed
              for i in range(*store.layers[layer]["ops"])}
    return TopDownResult(sorted(rows.values(), key=lambda r: (r.ops[0], -r.ops[1])), inside, culprit, td.units)


@dataclass
class TopDownResult:
    """What the run record needs from a top-down plan."""

    rows: list[UnitRow]
    inside: dict[int, str]  # op index -> the unit it ran inside (on the target)
    culprit: UnitCulprit | None
    units: Units

"""Assembling the run record: a pure function of what the steps and the isolated pass found."""

from __future__ import annotations

import datetime
import platform as _platform
from collections import Counter
from dataclasses import dataclass, field

import torch

from tapml.carving import FixtureStore
from tapml.core import Status, __version__
from tapml.record import RUN_SCHEMA, Culprit, Metrics, OpRef, OpRow, Plan, Reference, Run, Step, TargetEvent

from .localize import Localization, skip_reason
from .mixed import MixedResult
from .topdown import TopDownResult

__all__ = ["RunFacts", "build_run", "summary_line", "OP_STATUSES"]

OP_STATUSES = (Status.OK, Status.DIVERGENT, Status.UNSUPPORTED, Status.CRASHED, Status.TIMEOUT, Status.SKIPPED)


@dataclass
class RunFacts:
    """What the record says about the run besides its results."""

    store_path: str
    model: dict
    reference: Reference
    target: dict
    target_name: str
    plan: Plan
    rule: str
    compute_dtype: str | None
    target_stats: dict[str, int]
    target_events: list[TargetEvent]
    target_lost: str | None = None
    notes: list[str] = field(default_factory=list)
    units: TopDownResult | None = None  # a top-down plan's units, the ops inside them, the descent's end


def _row(rec: dict, local, mixed: MixedResult | None, noise: float | None) -> OpRow:
    row = OpRow(index=rec["index"], op=rec["op"], module=rec["module"], call=rec["call"], source=rec["source"],
                step=rec["step"], layer=rec["layer"], signature=rec["signature"], status=Status.SKIPPED)
    if local is not None:
        row.status, row.reason, row.local = local.status, local.reason, local.local
        row.reference_noise = local.reference_noise
    elif mixed is not None and mixed.status in (Status.UNSUPPORTED, Status.CRASHED, Status.TIMEOUT, Status.SKIPPED):
        row.status, row.reason = mixed.status, mixed.reason
    elif mixed is not None and mixed.propagated is not None:
        row.status, row.reason = Status.OK, "local error measured on an earlier call of the same signature"
    else:
        row.reason = skip_reason(rec) or "not selected by the plan"
    if mixed is not None and mixed.propagated is not None:
        row.propagated = mixed.propagated
        row.offloaded = mixed.status == Status.OFFLOADED
        row.target_ms = mixed.target_ms
        if row.local is not None and row.local.max_abs and mixed.propagated.max_abs is not None:
            row.amplification = mixed.propagated.max_abs / row.local.max_abs
    row.tolerance = (row.local or row.propagated or Metrics(ok=True)).tolerance
    if noise is not None:
        row.reference_noise = noise
    return row


def build_run(store: FixtureStore, facts: RunFacts, steps: list[Step], propagated: dict[int, MixedResult],
              loc: Localization) -> Run:
    """The run record, from the facts, the steps' results and the localization."""
    ops = [_row(rec, loc.results.get(rec["index"]), propagated.get(rec["index"]), loc.noise.get(rec["index"]))
           for rec in store.ops]
    victims = set(loc.victims)
    for row in ops:
        row.victim = row.index in victims
    culprit = _unit_culprit(store, facts, loc)
    for i, module in (facts.units.inside.items() if facts.units else ()):
        row = ops[i]
        row.offloaded = True
        if row.reason is None or row.reason == "not selected by the plan":
            row.reason = f"ran on the target inside the compiled unit {module}"
    compute = [o for o in ops if skip_reason(store.ops[o.index]) is None]  # views, random ops, ... never move
    offloaded = [o for o in compute if o.offloaded]
    counts = Counter(o.status for o in ops)
    if culprit is None and loc.culprit is not None:
        i = loc.culprit.index
        rec = store.ops[i]
        culprit = Culprit(index=i, op=rec["op"], module=rec["module"], call=rec["call"], source=rec["source"],
                          signature=rec["signature"], local=loc.culprit.local,
                          victims_downstream=len([v for v in loc.victims if v > i]),
                          step=store.steps[rec["step"]]["name"] if store.steps else None,
                          random_inputs=loc.random_inputs, candidates=loc.candidates, explains=loc.explains,
                          nondeterministic=loc.nondeterministic,
                          repro=f"tapml replay {facts.store_path} --platform {facts.target_name} --op {i}")
        found = facts.units.culprit if facts.units else None
        if found is not None and found.level == "op" and found.op == i:
            culprit.unit, culprit.descent = store.layers[found.layer]["module"], found.descent
    final = steps[-1].end_to_end if steps else Metrics(ok=True)
    verdict, reason = _verdict(culprit, steps, ops, counts, facts, len(compute), len(offloaded))
    first_nonfinite = next((OpRef(o.index, o.op, o.module, "local") for o in ops
                            if o.local is not None and o.local.new_nonfinite), None) \
        or next((OpRef(s.first_nonfinite.index, s.first_nonfinite.op, s.first_nonfinite.module, f"step {s.name}")
                 for s in steps if s.first_nonfinite), None)
    run = Run(
        schema=RUN_SCHEMA,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        versions={"tapml": __version__, "torch": torch.__version__, "python": _platform.python_version()},
        model=facts.model, store=facts.store_path, reference=facts.reference, target=facts.target, plan=facts.plan,
        rule=facts.rule, compute_dtype=facts.compute_dtype, verdict=verdict, summary="", culprit=culprit,
        victims=sorted(victims), counts={str(s): counts[s] for s in OP_STATUSES},
        isolated_counts={str(s): loc.isolated.get(str(s), 0) for s in OP_STATUSES},
        coverage=len(offloaded) / len(compute) if compute else 1.0, compute_ops=len(compute),
        offloaded_ops=len(offloaded), first_nonfinite=first_nonfinite,
        saturated_ops=[o.index for o in ops if o.local is not None and o.local.saturated],
        end_to_end=final, tokens=steps[-1].tokens if steps else None, steps=steps, ops=ops,
        target_stats=facts.target_stats, target_events=facts.target_events, reason=reason, notes=facts.notes,
        findings=loc.findings, units=facts.units.rows if facts.units else [],
    )
    run.summary = summary_line(run)
    return run


def _unit_culprit(store: FixtureStore, facts: RunFacts, loc: Localization) -> Culprit | None:
    """A top-down descent's end when no op is to blame: the op it reached (a non-first call the
    isolated pass had not measured), or the unit or fused kernel itself (graph-level)."""
    found = facts.units.culprit if facts.units else None
    if found is None or loc.culprit is not None:
        return None
    if found.level == "op":
        loc.culprit = loc.results[found.op]
        return None
    rec = store.layers[found.layer]
    unit = facts.units.units.built[found.layer][0]
    a, b = rec["ops"]
    model = (facts.model or {}).get("spec") or "MODEL"
    return Culprit(index=b - 1, op=found.kernel or f"{rec['class']} (compiled unit)", module=rec["module"],
                   call=rec["call"], signature=unit.signature, local=found.local, victims_downstream=0,
                   repro=f"tapml offload {model} --platform {facts.target_name} --plan top-down "
                         f"--layers '{rec['module']}'", level=found.level, unit=rec["module"],
                   kernel=found.kernel, covers=found.covers, descent=found.descent)


def _verdict(culprit, steps: list[Step], ops: list[OpRow], counts: Counter, facts: RunFacts, compute: int,
             offloaded: int) -> tuple[Status, str | None]:
    """divergent when any op or any step is out of bounds; incomplete whenever the run could not check
    what it was asked to (the target lost or failing, the live run off the carved path, nothing
    offloaded); ok only when everything it checked passed and something was checked."""
    bad_step = next((s for s in steps if not s.end_to_end.ok), None)
    if culprit is not None:
        return Status.DIVERGENT, None
    if bad_step is not None:
        return Status.DIVERGENT, f"the model output is out of bounds from step {bad_step.name!r} on"
    failed = counts[Status.CRASHED] + counts[Status.TIMEOUT]
    off_path = next((s for s in steps if s.diverged), None)
    if facts.target_lost:
        not_run = sum(1 for o in ops if o.reason and o.reason.startswith("not run:"))
        return Status.INCOMPLETE, f"{facts.target_lost}; {not_run} ops were not run on the target"
    if failed:
        return Status.INCOMPLETE, (f"{counts[Status.CRASHED]} ops crashed and {counts[Status.TIMEOUT]} timed "
                                   "out on the target")
    broken = sorted((u for u in (facts.units.rows if facts.units else []) if u.status == "failed"),
                    key=lambda u: "quarantined" in (u.reason or ""))  # the unit that failed first, then the rest
    if broken:
        return Status.INCOMPLETE, (f"{len(broken)} compiled units failed on the target and were not checked "
                                   f"(first: {broken[0].module or '(model)'}: {broken[0].reason})")
    if off_path is not None:
        return Status.INCOMPLETE, (f"step {off_path.name!r} left the carved path ({off_path.diverged}); "
                                   "the ops after it were not offloaded")
    if not compute:
        return Status.INCOMPLETE, "the model has no compute ops (only views, random or Python-value ops): " \
                                  "nothing was offloaded or checked"
    if not offloaded:
        return Status.INCOMPLETE, (f"nothing was offloaded: all {compute} compute ops stayed on the reference "
                                   f"({counts[Status.UNSUPPORTED]} unsupported by the target)")
    return Status.OK, None


def summary_line(r: Run) -> str:
    """The verdict in one sentence."""
    c = r.culprit
    tokens = r.tokens
    token_note = ""
    if tokens is not None and tokens.first_difference is not None:
        token_note = (f"; the generated tokens first differ at position {tokens.first_difference} "
                      f"(generated token {tokens.first_difference_generated}, step {tokens.step})")
    if c is not None:
        m, tol = c.local, c.local.tolerance
        where = f"{c.source.rsplit('/', 1)[-1]}" if c.source else "unknown source"
        if m.problem:
            how = m.problem
        elif m.bound is not None and r.rule == "bound":
            how = (f"{m.bound.ratio:.3g}× beyond the error a correct implementation may show (max abs "
                   f"{m.max_abs:.3g}; the reference sits at {m.bound.reference_ratio:.2g}×)")
        else:
            how = f"max abs {m.max_abs:.3g} against a tolerance of atol {tol.atol:.3g} + rtol {tol.rtol:.3g}"
        inherit = f"{c.victims_downstream} ops downstream inherit it" if c.victims_downstream else \
            "no op downstream is out of tolerance because of it"
        if c.level == "kernel":
            return (f"fused kernel {c.kernel} (computing {', '.join(c.covers[:4])}) inside {c.module} compiled as "
                    f"one unit diverges: {how}; every child module and op is within bounds alone{token_note}")
        if c.level == "unit":
            return (f"{c.module or '(model)'} compiled as one unit diverges: {how}; every child module and op is "
                    f"within bounds alone — a graph-level (fusion or layout) defect of the compiler{token_note}")
        return f"{c.op} in {c.module or '(model)'} (call {c.call}, {where}) diverges: {how}; {inherit}{token_note}"
    if r.verdict == Status.DIVERGENT:
        bad = next((s for s in r.steps if not s.end_to_end.ok), None)
        e = bad.end_to_end if bad is not None else r.end_to_end
        size = (f"{e.bound.ratio:.3g}× what correct rounding differences allow" if e.bound is not None
                else f"max abs {e.max_abs:.3g}" if e.max_abs is not None else e.problem)
        return (f"no single op is out of bounds, but the model output is ({size}, from step "
                f"{bad.name if bad else '?'!r} on): small errors accumulate{token_note}")
    if r.verdict == Status.INCOMPLETE:
        restarts = len([e for e in r.target_events if e.recovery != "lost"])
        return r.reason + (f" ({restarts} worker restarts)" if restarts else "")
    bounds = "within its error bound" if r.rule == "bound" else "within tolerance"
    notes = f"; {len(r.findings)} findings (see below)" if r.findings else ""
    return (f"every offloaded op is {bounds} on {r.target['name']}; "
            f"{r.coverage:.0%} of compute ops ran on the target{notes}")

"""``migrate``: plan steps on live mixed runs, the isolated pass, localization → the run record.

The engine talks to the target only through the ``Target`` interface, so it
cannot tell a spawned worker, a remote one or an in-process platform apart.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from tapml.carving import FixtureStore
from tapml.core import TapmlError
from tapml.judging import Judge
from tapml.platforms import Target
from tapml.record import Plan, Run, TargetEvent
from tapml.record import Reference as ReferenceRecord

from .build import RunFacts, build_run
from .exact import exact_outputs
from .localize import localize
from .mixed import run_step
from .plans import make_plan
from .probe import probe, rng_replay
from .quarantine import Quarantine
from .reference import Reference, torch_reference
from .saved import SavedReference
from .saved import saved_reference as saved_reference_of
from .steps import end_to_end, run_steps
from .topdown import localize_top_down, plan_top_down, top_down_steps

__all__ = ["migrate", "check_store"]


def check_store(store: FixtureStore) -> None:
    """Offload needs every op of the run: refuse truncated or filtered carves."""
    m = store.manifest
    if m.get("truncated"):
        raise TapmlError(f"{store.path} was carved with --max-bytes and is incomplete; offload needs a full carve")
    opts = m.get("options", {})
    if opts.get("modules") or opts.get("ops") or opts.get("unique"):
        raise TapmlError(f"{store.path} was carved with filters; offload needs every op of the run")


def _quarantine_note(target: Quarantine) -> list[str]:
    if not target.spared:
        return []
    return [f"{target.spared} calls were not sent: their signature crashed or timed out on the target earlier in "
            f"this run ({len(target.failed)} signatures quarantined)"]


def migrate(run: Callable[[], Any], store: FixtureStore, target: Target, *, judge: Judge, plan: str = "layers",
            layers: str | None = None, all_calls: bool = False, check_reference: bool = False,
            model_info: dict | None = None, on_event: Callable[[str, Any], None] | None = None,
            store_path: str | None = None, reference: Reference | None = None,
            restore: Callable[[], None] | None = None, saved_reference: bool = False) -> Run:
    """Migrate step by step, localize, and return the run record.

    ``restore`` puts the model's state back as it was when carved (``ModelState(model).restore``,
    taken before the carve); it runs before every live run. ``saved_reference``: the store's model
    outputs, not the live reference run's, judge the run end to end (``saved.py``)."""
    check_store(store)
    emit = on_event or (lambda *_: None)
    reference = reference or torch_reference()
    target = Quarantine(target)  # what crashed or hung is not sent again
    stats_before, events_before = Counter(target.stats), len(target.events)
    top = plan_top_down(store, target, layers, lambda m: emit("compile", m)) if plan == "top-down" else None
    steps_plan = top_down_steps(store, top) if top is not None else make_plan(store, plan, layers)
    exact = exact_outputs(store) if judge.rule != "tolerance" else None  # the model in float64: the truth
    with rng_replay(store, restore) as rng:
        run = rng(run)  # random ops repeat what the carve drew, in every live run
        # the reference run, live: the yardstick for end-to-end error and a check that the run repeats the carve
        ref = probe(run, store)
        saved = saved_reference_of(store, ref.output, reference.name) if saved_reference else None
        if saved is not None:
            ref.output = saved.output
        outcome = run_steps(run, store, target, steps_plan, judge, ref.output, emit, ref.excluded, exact)

        def impact(indices: list[int]) -> float:
            """The model output's error with only these ops on the target (ranking several culprits)."""
            emit("impact", None)
            output, _, _ = run_step(run, store, target, set(indices), judge)
            m = end_to_end(output, ref.output, judge, ref.excluded, exact)
            return m.bound.ratio if m.bound is not None else (m.max_abs if m.max_abs is not None else math.inf)

        emit("local", None)
        propagated = {i: r.propagated for i, r in outcome.propagated.items() if r.propagated is not None}
        loc = localize(store, target, judge, propagated, reference=reference, all_calls=all_calls,
                       check_reference=check_reference, on_result=lambda _: emit("op", None),
                       offloaded_with=outcome.offloaded_with, impact=impact, suspects=outcome.suspects)
        units = localize_top_down(store, top, target, judge, outcome, loc, reference) if top is not None else None
    facts = RunFacts(
        store_path=store_path or str(store.path), model=model_info or store.manifest.get("model", {}),
        reference=_reference_record(reference, store, saved), target=target.describe(), target_name=target.name,
        plan=Plan(kind=plan, layers=layers, steps=[s["name"] for s in steps_plan],
                  dag=[s["groups"] for s in steps_plan] if top is not None else [],
                  edges=top.edge_names(store) if top is not None else []), rule=judge.rule,
        compute_dtype=judge.compute_dtype,
        target_stats={k: int(v) for k, v in (Counter(target.stats) - stats_before).items()},
        target_events=[TargetEvent(**e) for e in target.events[events_before:]], target_lost=target.lost,
        notes=list(ref.excluded.values()) + _quarantine_note(target) + (saved.notes if saved else []), units=units)
    if saved is not None:
        loc.findings.extend(saved.findings)
    return build_run(store, facts, outcome.steps, outcome.propagated, loc)


def _reference_record(reference: Reference, store: FixtureStore, saved: SavedReference | None) -> ReferenceRecord:
    """The live reference, or the store's when its outputs judged the run (the live one named beside it)."""
    if saved is None or not saved.used:
        return reference.record
    carved = store.reference
    return ReferenceRecord(name=carved["name"], device=carved["device"], description=carved.get("description", ""),
                           saved=str(store.path), live=f"{reference.name} on {reference.record.device}")

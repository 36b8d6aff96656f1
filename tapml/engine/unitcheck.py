"""Module units as tests: the units a top-down run checks alone, each judged as the isolated unit pass
judges it — what the pytest plugin (``--tapml-units modules``) and ``emit-tests --units modules`` carve.

Which units: the top-down plan's on the target (``plan_top_down``: the repeated blocks
and the outermost calls around them, falling back to children where a call is not a
program or does not compile), the first call of each signature — as the engine checks
them alone after the live run — or every call (``all_calls``). A later call of a
signature is not tested on its own by default, exactly as a later call of an op.
"""

from __future__ import annotations

import torch

from tapml.carving import FixtureStore
from tapml.core import OpFailed, Status, UnitCall
from tapml.judging import Judge
from tapml.platforms import Target, Unsupported

from .descent import judge_unit
from .localize import LocalResult
from .topdown import plan_top_down
from .units import Units

__all__ = ["select_units", "unit_alone"]


def select_units(store: FixtureStore, target: Target, *, all_calls: bool = False,
                 layers: str | None = None) -> tuple[Units, list[int]]:
    """The units (module call indices, in call order) a top-down run on ``target`` checks alone: the first
    of each signature, or every one. Compiles each unique unit on ``target`` (the plan needs to know)."""
    td = plan_top_down(store, target, layers)
    seen: set[str] = set()
    chosen = []
    for layer in td.frontier:
        signature = td.units.built[layer][0].signature
        if all_calls or signature not in seen:
            chosen.append(layer)
        seen.add(signature)
    return td.units, chosen


def unit_alone(target: Target, judge: Judge, unit: UnitCall, inputs: list[torch.Tensor],
               want: list[torch.Tensor], *, keep_outputs: bool = False) -> LocalResult:
    """A unit on its carved inputs, as an isolated result: ok, divergent, unsupported (the target will not
    compile it), crashed or timeout. ``index`` is the module call's index among the carved layers."""
    here = (unit.index, unit.cls, unit.module)
    try:
        support = target.prepare_unit(unit)
        if not support:
            raise Unsupported(support.reason)
        metrics, got = judge_unit(target, judge, unit, inputs, want)
    except Unsupported as e:
        return LocalResult(*here, Status.UNSUPPORTED, e.reason)
    except OpFailed as e:
        return LocalResult(*here, e.status, f"{type(e).__name__}: {e}", lost=e.fatal)
    metrics.rule = metrics.rule or judge.rule
    return LocalResult(*here, Status.OK if metrics.ok else Status.DIVERGENT, local=metrics,
                       outputs=got if keep_outputs else [])

"""Compiled units inside a live mixed run: the module's ops run on the reference while its inputs and
outputs are captured; at its last op the target runs the whole unit, and its outputs replace the
reference's in the live tensors, so they flow on into the rest of the model.

Why run the reference too: the live tensors the rest of the model holds are the reference's
objects; writing the target's values into them (``copy_``) is what makes the unit's outputs
flow on without knowing how the model's Python code passes them around.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tapml.carving import FixtureStore
from tapml.core import OpFailed, Status, UnitCall, tensors_in
from tapml.judging import Judge
from tapml.platforms import Target, Unsupported
from tapml.record import Metrics

from .outputs import end_to_end
from .units import UnitSpan, carved_outputs

__all__ = ["UnitResult", "UnitRunner"]


@dataclass
class UnitResult:
    """What happened to one unit in a mixed run."""

    status: Status  # offloaded, fell back, unsupported, crashed, timeout, skipped
    reason: str | None = None
    propagated: Metrics | None = None
    target_ms: float | None = None


class _Active:
    """One unit while the live run is inside it: what has been captured so far."""

    def __init__(self, unit: UnitCall, span: UnitSpan):
        self.unit, self.span = unit, span
        self.inputs: list[torch.Tensor | None] = [None] * len(unit.inputs)
        self.outputs: list[torch.Tensor | None] = [None] * len(span.outputs)
        self.reads: dict[int, list[tuple[int, int]]] = {}  # op -> [(tensor position, unit input)]
        for n, (i, p) in enumerate(span.inputs):
            self.reads.setdefault(i, []).append((p, n))
        self.makes: dict[int, list[tuple[int, int]]] = {}  # op -> [(output slot, unit output)]
        for n, (i, k) in enumerate(span.outputs):
            self.makes.setdefault(i, []).append((k, n))


class UnitRunner:
    """The units a step runs on the target, driven op by op from ``MixedRun``."""

    def __init__(self, store: FixtureStore, target: Target, judge: Judge, units: list[tuple[UnitCall, UnitSpan]]):
        self.store, self.target, self.judge = store, target, judge
        self.by_op: dict[int, _Active] = {}
        for unit, span in units:
            active = _Active(unit, span)
            for i in range(span.first, span.end):
                self.by_op[i] = active
        self.results: dict[int, UnitResult] = {}  # by layer
        self.target_s = 0.0
        self.stopped = False

    def owns(self, index: int) -> bool:
        return not self.stopped and index in self.by_op

    def on_op(self, index: int, args, kwargs, run_reference) -> object:
        """Op ``index`` (inside a unit) on the reference, capturing what the unit needs."""
        active = self.by_op[index]
        if active.reads.get(index):
            live = tensors_in([args, kwargs])
            for p, n in active.reads[index]:
                active.inputs[n] = live[p]
        out = run_reference()
        if active.makes.get(index):
            made = tensors_in(out)
            for k, n in active.makes[index]:
                active.outputs[n] = made[k]
        if index == active.span.end - 1:
            self._finish(active)
        return out

    def _finish(self, active: _Active) -> None:
        unit = active.unit
        start = time.perf_counter()
        try:
            got = self.target.execute_unit(unit, list(active.inputs))
        except Unsupported as e:
            self.results[unit.index] = UnitResult(Status.UNSUPPORTED, e.reason)
            return
        except OpFailed as e:
            self.results[unit.index] = UnitResult(e.status, f"{type(e).__name__}: {e}")
            if e.fatal:
                self.stopped = True
            return
        finally:
            self.target_s += time.perf_counter() - start
        elapsed = (time.perf_counter() - start) * 1e3
        want = carved_outputs(self.store, active.span)
        metrics = end_to_end(got, want, self.judge)
        result = self.results[unit.index] = UnitResult(Status.OFFLOADED, propagated=metrics, target_ms=elapsed)
        if len(got) != len(active.outputs) or any(g.shape != o.shape for g, o in zip(got, active.outputs,
                                                                                       strict=False)):
            result.status, result.reason = Status.FELL_BACK, metrics.problem or "output count differs"
            return
        with torch.no_grad():
            for g, live in zip(got, active.outputs, strict=True):
                if torch._debug_has_internal_overlap(live) == 1:  # an expanded output: one value per element
                    continue
                live.copy_(g.to(live.dtype))

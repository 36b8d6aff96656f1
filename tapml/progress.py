"""Watching an offload: the engine's events as progress with totals, and the time spent compiling.

Why here and not in the engine: the engine reports what happens (``step``, ``op``,
``local``, ``impact``); a display needs how much is left, which the plan and the
isolated pass's selection already say, and step timing wants compile time apart
from transfer, which timing the target's ``prepare`` calls gives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .carving import FixtureStore
from .engine import make_plan, select_ops, skip_reason
from .platforms import Target, TargetWrapper

__all__ = ["Progress", "ProgressEvents", "CompileClock"]


@dataclass
class Progress:
    """What an offload is doing, for a progress display: ``phase`` ("step", "isolated pass",
    "ranking"), a label, how many ops of it are done and how many there will be."""

    phase: str
    label: str
    done: int = 0
    total: int | None = None
    step: int | None = None  # k of n steps (0-based), for the "step" phase
    steps: int | None = None


class ProgressEvents:
    """The engine's events (``step``, ``op``, ``local``, ``impact``) as ``Progress``: totals come from the
    plan (every live run dispatches the whole model's selected ops) and from the isolated pass's selection."""

    def __init__(self, store: FixtureStore, plan: str, layers: str | None, all_calls: bool,
                 on_progress: Callable[[Progress], None] | None, on_event: Callable[[str, Any], None] | None):
        self.on_progress, self.on_event = on_progress, on_event
        self.offloaded = [sum(1 for i in s["offload"] if not _stays(store, i))
                          for s in (make_plan(store, plan, layers) if plan != "top-down" else [])]
        self.isolated = len([i for i in select_ops(store, all_calls=all_calls) if not _stays(store, i)])
        self.current: Progress | None = None

    def __call__(self, kind: str, payload: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, payload)
        if kind == "step":
            k, n, name = payload
            self._start(Progress("step", name, 0, self.offloaded[k] if k < len(self.offloaded) else None, k, n))
        elif kind == "local":
            self._start(Progress("isolated pass", "isolated pass", 0, self.isolated))
        elif kind == "impact":
            self._start(Progress("ranking", "ranking culprits by their effect on the output"))
        elif kind == "op" and self.current is not None:
            self.current.done += 1
            if self.current.total is not None and self.current.done > self.current.total:
                self.current.total = self.current.done  # the pass added calls whose chained error was bad
            self._emit()

    def _start(self, p: Progress) -> None:
        self.current = p
        self._emit()

    def _emit(self) -> None:
        if self.on_progress is not None and self.current is not None:
            self.on_progress(self.current)


def _stays(store: FixtureStore, index: int) -> bool:
    return skip_reason(store.ops[index]) is not None


class CompileClock(TargetWrapper):
    """The target with the time spent preparing (compiling) kernels counted, so step timing can show
    compile time apart from transfer; the engine sees the same target otherwise."""

    def __init__(self, target: Target):
        super().__init__(target)
        self.compile_s = 0.0

    def _timed(self, prepare, what):
        start = time.perf_counter()
        try:
            return prepare(what)
        finally:
            self.compile_s += time.perf_counter() - start

    def prepare(self, op):
        return self._timed(self.target.prepare, op)

    def prepare_unit(self, unit):
        return self._timed(self.target.prepare_unit, unit)


"""Compiled units inside a live mixed run: while the live run is inside a unit, its compute ops are not
run on the reference — each returns a stand-in (an allocated tensor of the carved layout, filled with
NaN) and is remembered; views and in-place ops run as they are, so the model's Python code sees the
tensors it expects. At the unit's last op the target runs the whole unit, and its outputs are written
into the live tensors (``copy_``), so they flow on into the rest of the model. A pipelining target
(a worker across a socket) gets the unit without waiting: its outputs stay stand-ins, pending under
names in ``InFlight`` (the next unit takes them on the worker), and the answer is judged and written
when the reference must read it or the step ends; if it cannot be used, the units sent after it run
again one at a time.

Why stand-ins: the reference has nothing to add inside a unit (the unit is judged against the carved
outputs), and computing it would put a whole reference forward on the offload's critical path. Why
NaN: a stand-in that leaked out unwritten would otherwise hold whatever the allocator left there —
possibly the previous forward's right answer. When the target cannot run the unit (unsupported,
crashed, a wrong output shape), or the live run leaves the unit early, the remembered ops run again on
the reference in order, rebinding each stand-in (``set_``) to the reference's result: the model goes on
exactly as if the unit had never been offloaded.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tapml.carving import FixtureStore
from tapml.core import (
    OpFailed,
    Status,
    UnitCall,
    decode_value,
    dtype_from_name,
    iter_specs,
    op_info_by_name,
    overwrite,
    tensors_in,
)
from tapml.judging import Judge
from tapml.platforms import Target, Unsupported
from tapml.record import Metrics

from .inflight import InFlight, Sent, crashed_or_hung
from .outputs import end_to_end
from .units import UnitSpan
from .vouch import vouched

__all__ = ["UnitResult", "UnitRunner"]

Reference = Callable[[object, tuple, dict], object]  # (func, args, kwargs) -> the reference's result


@dataclass
class UnitResult:
    """What happened to one unit in a mixed run."""

    status: Status  # offloaded, fell back, unsupported, crashed, timeout, skipped
    reason: str | None = None
    propagated: Metrics | None = None
    target_ms: float | None = None  # one at a time: its round trip; pipelined: the worker's kernel time


def _plan(op: dict) -> tuple[str, object]:
    """How the live run treats an op inside a unit: ``("stand-in", [(shape, stride, dtype)])`` for a compute
    op (its carved outputs); ``("in place", returned)`` for an op that writes its arguments — it returns them
    unwritten (its arguments may be stand-ins: an index it would follow is not a real one), the write is
    the target's, or the reference's on a recompute; ``("run", None)`` for what runs as it is: views
    (their results alias what the model holds), outputs not laid out from offset 0; ``("fresh", None)``
    for a factory (no tensor input): it runs as it is and its result is already true."""
    info = op_info_by_name(op["op"], op.get("library") or "")
    if not list(iter_specs([op["args"], op["kwargs"]])):
        return "fresh", None
    if op["view"]:
        return "run", None
    if info.mutated:
        return ("in place", info.returned) if all(m is not None for m in info.returned) else ("run", None)
    specs = []
    for s in iter_specs(op["outputs"]):
        if s.get("offset") or not s.get("exact", True):
            return "run", None
        specs.append((tuple(s["shape"]), tuple(s["stride"]), dtype_from_name(s["dtype"])))
    return "stand-in", specs


def _whole(t: torch.Tensor | None) -> bool:
    """A live unit output a later run may take by name: alive, contiguous from offset 0 over its whole
    storage (as the worker holds it), on the CPU, no element shared."""
    return (t is not None and t.device.type == "cpu" and t.numel() > 0 and t.is_contiguous()
            and not t.storage_offset() and t.nbytes == t.untyped_storage().nbytes()
            and torch._debug_has_internal_overlap(t) != 1)


def _stand_in(shape: tuple, stride: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    if dtype.is_floating_point or dtype.is_complex:
        return t.fill_(float("nan"))
    return t.fill_(True if dtype == torch.bool else torch.iinfo(dtype).max)


class _Active:
    """One unit while the live run is inside it: what has been captured so far, and the ops that ran with
    stand-ins (to run again on the reference if the target's values cannot be used)."""

    def __init__(self, unit: UnitCall, span: UnitSpan, store: FixtureStore):
        self.unit, self.span = unit, span
        self.inputs: list[torch.Tensor | None] = [None] * len(unit.inputs)
        self.outputs: list[weakref.ref | None] = [None] * len(span.outputs)  # weak: see ``UnitRunner``
        self.reads: dict[int, list[tuple[int, int]]] = {}  # op -> [(tensor position, unit input)]
        for n, (i, p) in enumerate(span.inputs):
            self.reads.setdefault(i, []).append((p, n))
        self.makes: dict[int, list[tuple[int, int]]] = {}  # op -> [(output slot, unit output)]
        for n, (i, k) in enumerate(span.outputs):
            self.makes.setdefault(i, []).append((k, n))
        self.plans = {i: _plan(store.ops[i]) for i in range(span.first, span.end)}
        self.ops: list[tuple] = []  # (index, func, args, kwargs, result) of the ops run so far

    def lives(self) -> list[torch.Tensor | None]:
        """The unit's outputs as the live run holds them (None: nothing does any more)."""
        return [ref() if ref is not None else None for ref in self.outputs]

    def reset(self) -> None:
        self.inputs = [None] * len(self.inputs)
        self.outputs = [None] * len(self.outputs)
        self.ops = []


class UnitRunner:
    """The units a step runs on the target, driven op by op from ``MixedRun``.

    What the live run made inside a unit is held weakly: torch's factory bindings (``full``, ``full_like``)
    detach a result that Python still holds, and that extra ``detach`` would make the live run differ from
    the carve; what nothing holds any more needs no value."""

    def __init__(self, store: FixtureStore, target: Target, judge: Judge, units: list[tuple[UnitCall, UnitSpan]]):
        self.store, self.target, self.judge = store, target, judge
        self.by_op: dict[int, _Active] = {}
        for unit, span in units:
            active = _Active(unit, span, store)
            for i in range(span.first, span.end):
                self.by_op[i] = active
        self.results: dict[int, UnitResult] = {}  # by layer
        self.target_s = 0.0
        self.stopped = False
        self._lost = False  # the target was lost while answers were settled: stop at the next op (not mid-drain)
        self.current: _Active | None = None  # the unit the live run is inside
        self.diverge: Callable[[str], None] = lambda why: self.stop()  # ``MixedRun`` says where it diverged
        # a pipelining target (``MixedRun.attach``): units sent without waiting, answered through the flight
        self.flight: InFlight | None = None
        self.drain: Callable[[], None] = lambda: None  # every answer in flight read, judged and filled
        self.plain: Reference | None = None  # the reference, never waiting on the flight: what recomputes
        self._sent: dict[int, _Active] = {}  # id(Sent) -> the unit it carries

    def owns(self, index: int) -> bool:
        if self._lost and not self.stopped:
            self.stop()  # what ran with stand-ins in the unit the live run is in runs on the reference now
        return not self.stopped and index in self.by_op

    def on_op(self, index: int, func, args, kwargs, reference: Reference) -> object:
        """Op ``index`` (inside a unit): a stand-in result (see ``_plan``),
        capturing what the unit needs; the whole unit on the target at its last op."""
        active = self.by_op[index]
        if active is not self.current:
            if self.current is not None:  # the live run left a unit before its last op
                self.abandon()
            self.current = active
            active.reset()
        if active.reads.get(index):
            live = tensors_in([args, kwargs])
            for p, n in active.reads[index]:
                if tuple(live[p].shape) != active.unit.input_specs[n].shape:
                    self.diverge(f"op {index} ({func}): unit {active.unit.module or 'model'}'s input {n} has "
                                 f"shape {tuple(live[p].shape)}, the carve had {active.unit.input_specs[n].shape}")
                    return reference(func, args, kwargs)
                active.inputs[n] = live[p]
        kind, how = active.plans[index]
        if kind in ("run", "fresh"):
            out = reference(func, args, kwargs)
        else:
            if kind == "stand-in":
                device = tensors_in([args, kwargs])[0].device
                made = iter([_stand_in(*s, device) for s in how])
            else:  # in place: the arguments it writes, as they are
                made = iter([args[m] if isinstance(m, int) else kwargs[m] for m in how])
            out = decode_value(self.store.ops[index]["outputs"], lambda _: next(made))
        if kind != "fresh":  # a factory's result is already true: nothing to recompute
            active.ops.append((index, func, args, kwargs, [weakref.ref(t) for t in tensors_in(out)]))
        if active.makes.get(index):
            made = tensors_in(out)
            for k, n in active.makes[index]:
                active.outputs[n] = weakref.ref(made[k])
        if index == active.span.end - 1:
            self.current = None
            self._finish(active)
        return out

    def end(self) -> None:
        """The step's live run is over (every answer settled): a unit it never finished runs on the
        reference, and a target lost while settling stops the units."""
        self.stopped |= self._lost
        self.abandon()

    def abandon(self) -> None:
        """The live run stops offloading (a divergence) or leaves the unit early: what ran with stand-ins
        runs again on the reference."""
        if self.current is not None:
            active, self.current = self.current, None
            self.drain()  # its ops read what runs in flight produce
            self._recompute(active)
            self.results[active.unit.index] = UnitResult(Status.SKIPPED, "the live run left the unit before its "
                                                         "last op: it ran on the reference")

    def stop(self) -> None:
        self.stopped = True
        self.abandon()

    def _recompute(self, active: _Active, sent: Sent | None = None) -> None:
        """Every op of the unit so far, again on the reference, in order; each stand-in (and each view of
        one) is rebound to the reference's result, so every tensor the model holds has its true value.
        ``sent``: the unit went without waiting, and the live run may have taken views of its outputs
        since — those still see the memory the outputs had, so the true values are written there too."""
        reference = self.plain
        true_outputs: list[torch.Tensor | None] = [None] * len(active.outputs)
        for index, func, args, kwargs, outs in active.ops:  # in place: it returns (and wrote) what it was given
            made = tensors_in(reference(func, args, kwargs))
            for ref, true in zip(outs, made, strict=True):
                mine = ref()
                if mine is not None and mine is not true:  # dead: nothing holds it, nothing reads it
                    mine.set_(true)
            for k, n in active.makes.get(index, ()):
                true_outputs[n] = made[k]
        active.ops = []
        if sent is not None:
            for memory, true in zip(sent.memory(), true_outputs, strict=True):
                if memory is not None and true is not None and memory.data_ptr() != true.data_ptr():
                    overwrite(memory, true)

    def _failed(self, active: _Active, sent: Sent | None, status: Status, reason: str, fatal: bool = False) -> None:
        """The target could not run the unit: its outputs from the reference, and why in its result."""
        self._recompute(active, sent)
        self.results[active.unit.index] = UnitResult(status, reason)
        self._lost |= fatal

    def _judged(self, active: _Active, got: list[torch.Tensor], target_ms: float, lives: list, sent: Sent | None
                ) -> bool:
        """The target's outputs judged against the carve (the unit's result); False when they cannot flow on
        (another count or shape than the live outputs): the reference's values flow on instead."""
        refs = [self.store.output_refs(i)[k] for i, k in active.span.outputs]
        metrics = end_to_end(got, vouched(self.store, refs, got, self.target), self.judge)
        result = self.results[active.unit.index] = UnitResult(Status.OFFLOADED, propagated=metrics,
                                                               target_ms=target_ms)
        if len(got) == len(lives) and all(t is None or g.shape == t.shape for g, t in zip(got, lives, strict=True)):
            return True
        self._recompute(active, sent)
        result.status, result.reason = Status.FELL_BACK, metrics.problem or "output count differs"
        return False

    def _finish(self, active: _Active) -> None:
        if self._send(active):
            return
        self.drain()  # one at a time: nothing may be in flight
        self._execute(active)

    def _send(self, active: _Active) -> bool:
        """The unit sent without waiting (a pipelining target that has it prepared); its outputs stay
        stand-ins until the answer is read. False: run it one at a time."""
        if self.flight is None:
            return False
        lives = active.lives()
        if len(lives) != len(active.unit.output_specs) or not all(_whole(t) for t in lives):
            return False
        s = self.flight.send_unit(active.unit, list(active.inputs), lives)
        if s is None:
            return False
        self._sent[id(s)] = active
        return True

    def settle(self, s: Sent, got: list[torch.Tensor] | None, error: BaseException | None, kernel_s: float
               ) -> tuple[list[torch.Tensor] | None, bool]:
        """A sent unit's answer (``InFlight``'s settle): ``(values for its live outputs, whether later answers
        stand)``; None values: run it again one at a time."""
        active = self._sent.pop(id(s))
        if got is None:
            if not crashed_or_hung(error):
                self._sent[id(s)] = active  # refused, failed or unanswered: one at a time says why
                return None, False
            self._failed(active, s, error.status, f"{type(error).__name__}: {error}", error.fatal)
            return s.placeholders(), False
        lives = s.placeholders()
        # what later runs took by name is not what flows on (another shape, another dtype): they run again
        if not self._judged(active, got, kernel_s * 1e3, lives, s):
            return s.placeholders(), False
        active.ops = []
        if any(t is not None and g.dtype != t.dtype for g, t in zip(got, lives, strict=True)):
            for g, t in zip(got, lives, strict=True):  # the target's values, converted, as one at a time
                if t is not None:
                    overwrite(t, g.to(t.dtype))
            return lives, False
        return got, True

    def rerun(self, s: Sent) -> list[torch.Tensor]:
        """A sent unit again, one at a time (``InFlight`` has read every answer in flight); on the reference
        once the target is lost, as the units after a loss run one at a time (no result of its own)."""
        active = self._sent.pop(id(s))
        if self._lost or self.stopped:
            self._recompute(active, s)
        else:
            self._execute(active, s)
        return s.placeholders()

    def _execute(self, active: _Active, sent: Sent | None = None) -> None:
        """The unit on the target, waiting for its answer; its outputs written into the live tensors
        (``sent``: it went without waiting first, see ``_recompute``)."""
        start = time.perf_counter()
        try:
            got = self.target.execute_unit(active.unit, list(active.inputs))
        except Unsupported as e:
            self._failed(active, sent, Status.UNSUPPORTED, e.reason)
            return
        except OpFailed as e:
            self._failed(active, sent, e.status, f"{type(e).__name__}: {e}", e.fatal)
            return
        finally:
            self.target_s += time.perf_counter() - start
        lives = active.lives()
        if not self._judged(active, got, (time.perf_counter() - start) * 1e3, lives, sent):
            return
        with torch.no_grad():
            lives = [(g, live) for g, live in zip(got, lives, strict=True) if live is not None]
            if any(torch._debug_has_internal_overlap(live) == 1 for _, live in lives):
                self._recompute(active, sent)  # an expanded output (one value per element): the reference's values
            for g, live in lives:
                if torch._debug_has_internal_overlap(live) != 1:
                    overwrite(live, g.to(live.dtype))
        active.ops = []

"""Mixed execution: the model runs eagerly on the reference while the ops a step
selects run on the target, and their outputs flow on into the rest of the model.

A target across a socket gets the selected ops without waiting for each answer (``inflight``: their
outputs are placeholders until the answers are read); everything below holds for both ways.

Carved ops are matched to the live run by dispatch order (the ``seq`` the
tracer recorded) and checked by overload and input shapes; if the live run
takes another path (data-dependent control flow reacting to the target's
numbers), offloading stops for the rest of that step and the record says where.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tapml.carving import FixtureStore, ModelRaised
from tapml.core import (
    OpFailed,
    Status,
    TapmlError,
    UnitCall,
    bump_undeclared,
    decode_value,
    op_info,
    overwrite,
    relayout,
    tensors_in,
)
from tapml.judging import Judge
from tapml.platforms import Target, Unsupported
from tapml.record import Metrics, OpRef

from .inflight import InFlight, Sent, crashed_or_hung
from .localize import skip_reason
from .threads import OwnThreads
from .unitrun import UnitRunner
from .vouch import carved_for

__all__ = ["MixedRun", "MixedResult", "MixedRunFailed", "run_step"]


class MixedRunFailed(TapmlError):
    """tapml's own work during a live run failed (judging, sending, receiving) — not the model: an error
    there used to reach the user as "the model raised"."""


def _tapml_failed(where: str, e: Exception) -> MixedRunFailed:
    return MixedRunFailed(f"tapml failed {where} (not the model; --debug shows the traceback): "
                          f"{type(e).__name__}: {e}")


def _mark_model_s(e: BaseException) -> None:
    """Tag an exception raised by one of the model's own ops, so it is not taken for tapml's."""
    e.tapml_model_raised = True


def _attributed(e: BaseException) -> bool:
    """Already says who failed: one of the model's ops (tagged), or a TapmlError naming tapml's problem."""
    return getattr(e, "tapml_model_raised", False) or isinstance(e, TapmlError)


@dataclass
class MixedResult:
    """What happened to one selected op in a mixed run."""

    status: Status  # offloaded, fell back, unsupported, crashed, timeout
    reason: str | None = None
    propagated: Metrics | None = None
    target_ms: float | None = None  # one run at a time: its round trip; pipelined: the worker's kernel time


def _reference(func, args, kwargs):
    """Run on the reference; an op that writes arguments without saying so gets their versions bumped."""
    out = func(*args, **kwargs)
    bump_undeclared(op_info(func), args, kwargs)
    return out


class MixedRun(TorchDispatchMode):
    """Sends the selected carved ops to ``target`` during a live run."""

    def __init__(self, store: FixtureStore, target: Target, selected: set[int], judge: Judge,
                 on_op: Callable[[], None] | None = None, units: UnitRunner | None = None):
        super().__init__()
        self.store, self.target, self.judge, self.on_op = store, target, judge, on_op
        self.units = units  # compiled units: their ops run here, the unit on the target at its last op
        self.selected = set(selected)
        self.by_seq = {rec["seq"]: rec for rec in store.ops}
        self.seq = 0
        self.results: dict[int, MixedResult] = {}
        self.diverged: str | None = None
        self.target_s = 0.0
        self.compare_s = 0.0
        self.first_nonfinite: OpRef | None = None
        self.lost: str | None = None  # the target is gone: nothing more was sent this step
        # runs sent before the last is answered (a target across a socket): see ``inflight``
        self.flight = InFlight(target, self._settle, self._rerun) if target.pipelines else None
        if units is not None:
            units.diverge, units.flight, units.drain, units.plain = self._diverge, self.flight, self.settle, self._ref
        self.threads = OwnThreads(self.flight is not None)  # entered by run_step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            return self._dispatch(func, args, kwargs or {})
        except Exception as e:
            if _attributed(e):
                raise
            raise _tapml_failed(f"at the live run's call {self.seq - 1} ({func})", e) from e

    def _dispatch(self, func, args, kwargs):
        rec = self.by_seq.get(self.seq)
        self.seq += 1
        if rec is not None and self.units is not None and self.units.owns(rec["index"]):
            if rec["op"] != str(func):
                self._diverge(f"op {rec['index']}: the live run called {func} where the carve had {rec['op']}")
                return self._reference(func, args, kwargs)
            # what a unit's op reads may still be in flight: ``_reference`` waits for it where it must
            return self.units.on_op(rec["index"], func, args, kwargs, self._reference)
        if rec is None or rec["index"] not in self.selected:
            return self._reference(func, args, kwargs)
        index = rec["index"]
        if rec["op"] != str(func):
            self._diverge(f"op {index}: the live run called {func} where the carve had {rec['op']}")
            return self._reference(func, args, kwargs)
        live = tensors_in([args, kwargs])
        device = live[0].device if live else torch.get_default_device()  # the live run's (the reference device)
        op = self.store.op_call(index)
        if [tuple(t.shape) for t in live] != [s.shape for s in op.inputs]:
            self._diverge(f"op {index} ({rec['op']}): input shapes differ from the carve")
            return self._reference(func, args, kwargs)
        if self.flight is not None and device.type == "cpu":
            self.flight.poll()
            out = self.flight.send(index, rec, func, args, kwargs, op, live)
            if out is not None:
                if self.on_op is not None:
                    self.on_op()
                return out
            self.flight.drain()
        live = [t.cpu() for t in live]  # the target and the judge see the store's device, the CPU
        return self._offload(index, rec, func, args, kwargs, op, live, device)

    def _reference(self, func, args, kwargs):
        """A reference op: after the answers in flight when it reads a placeholder or writes in place."""
        if self.flight is not None and self.flight.blocks(func, args, kwargs):
            self.flight.drain()
        return self._ref(func, args, kwargs)

    def _ref(self, func, args, kwargs):
        """A reference op, at the thread count the run began with (``OwnThreads``)."""
        try:
            return self.threads.reference(_reference, func, args, kwargs)
        except Exception as e:
            _mark_model_s(e)  # it would raise in a plain run too
            raise

    def settle(self) -> None:
        """Every run in flight answered, judged, and its placeholders filled."""
        if self.flight is None:
            return
        try:
            self.flight.drain()
        except Exception as e:
            if _attributed(e):
                raise
            raise _tapml_failed("judging the answers of the step", e) from e

    def _offload(self, index: int, rec: dict, func, args, kwargs, op, live: list[torch.Tensor], device):
        """The op on the target, one run at a time: its outputs judged and handed back, else the reference's."""
        outputs = self._on_target(index, op, live)
        if outputs is None:
            return self._ref(func, args, kwargs)
        outputs = self._judged(index, rec, op, outputs, live)
        if outputs is None:
            return self._ref(func, args, kwargs)
        try:
            return self._hand_back(func, rec, op, [o.to(device) for o in outputs], args, kwargs)
        except Exception as e:  # tapml's own failure: the op falls back, the model is not blamed
            result = self.results[index]
            result.status = Status.FELL_BACK
            result.reason = f"tapml could not hand the target's outputs back: {type(e).__name__}: {e}"
            return self._ref(func, args, kwargs)

    def _judged(self, index: int, rec: dict, op, outputs: list[torch.Tensor], live: list[torch.Tensor]
                ) -> list[torch.Tensor] | None:
        """The target's outputs judged against the carve (into ``results[index]``); what flows on, or None
        when they cannot (the op falls back)."""
        start = time.perf_counter()
        want = carved_for(self.store, index, outputs, self.target)
        flows = [self.store.graph.live(index, k) for k in range(len(want))]
        # chained: judged against the carved output by tolerance (the bound is for local errors)
        metrics = self.judge.judge(op, outputs, want, live, oracle=False, live=flows)
        self.compare_s += time.perf_counter() - start
        result = self.results[index]
        result.propagated = metrics
        if metrics.new_nonfinite and self.first_nonfinite is None:
            self.first_nonfinite = OpRef(index, rec["op"], rec["module"])
        if len(outputs) != len(want) or any(o.shape != w.shape for o, w, f in zip(outputs, want, flows, strict=False)
                                            if f):
            result.status = Status.FELL_BACK  # a wrong shape cannot flow on: the reference result does
            result.reason = metrics.problem or "output count differs"
            return None
        # an output nothing reads (layer norm's mean/rstd in inference) with a wrong shape: the carved value
        # stands in, so the op's live outputs still come from the target
        return [o if f or o.shape == w.shape else w.clone() for o, w, f in zip(outputs, want, flows, strict=True)]

    def _settle(self, s: Sent, outputs: list[torch.Tensor] | None, error: BaseException | None, kernel_s: float
                ) -> tuple[list[torch.Tensor] | None, bool]:
        """A pipelined run's answer: ``(values for its placeholders, whether later answers stand)``; None
        values: run it again one at a time (an error reply, no answer)."""
        if isinstance(s.op, UnitCall):
            return self.units.settle(s, outputs, error, kernel_s)
        if outputs is None:
            if not crashed_or_hung(error):
                return None, False  # refused, failed or unanswered: one at a time says why, as it would have
            self.results[s.index] = MixedResult(error.status, f"{type(error).__name__}: {error}")
            if error.fatal:
                self.lost, self.selected = str(error), set()
            return self._flat(self._ref(s.func, s.args, s.kwargs)), False
        self.results[s.index] = MixedResult(Status.OFFLOADED, target_ms=kernel_s * 1e3)
        judged = self._judged(s.index, s.rec, s.op, outputs, s.live)
        if judged is None:
            return self._flat(self._ref(s.func, s.args, s.kwargs)), False
        return judged, True

    def _rerun(self, s: Sent) -> list[torch.Tensor]:
        """A pipelined op again, one run at a time (the reference's when nothing more goes to the target)."""
        if isinstance(s.op, UnitCall):
            return self.units.rerun(s)
        if s.index not in self.selected:
            self.results.pop(s.index, None)
            return self._flat(self._ref(s.func, s.args, s.kwargs))
        return self._flat(self._offload(s.index, s.rec, s.func, s.args, s.kwargs, s.op, s.live, torch.device("cpu")))

    @staticmethod
    def _flat(value) -> list[torch.Tensor]:
        return tensors_in(value)

    def _hand_back(self, func, rec: dict, op, outputs: list[torch.Tensor], args, kwargs):
        """The target's outputs as the live model expects them: the carved dtypes and layouts (strides,
        storage offset — the reference's kernels chose them, and later ops take other paths for
        others), and written into the caller's tensors where the schema says the op writes them."""
        info = op_info(func)
        laid = [relayout(o.to(spec.torch_dtype), spec, copy=False) for o, spec in zip(outputs, op.output_specs,
                                                                                     strict=True)]
        if info.mutated:
            if len(laid) != len(info.returned):
                raise ValueError("an in-place op returning a list cannot be written back")
            for r, m in enumerate(info.returned):
                if m is not None:  # this return is the argument written in place
                    dst = args[m] if isinstance(m, int) else kwargs[m]
                    overwrite(dst, laid[r])
                    laid[r] = dst
        it = iter(laid)
        return decode_value(rec["outputs"], lambda _: next(it))

    def _on_target(self, index: int, op, live: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Run the op on the target; None (and a recorded reason) when it cannot."""
        start = time.perf_counter()
        try:
            support = self.target.prepare(op)
            if not support:
                raise Unsupported(support.reason)
            outputs = self.target.execute(op, live)
        except Unsupported as e:
            self.results[index] = MixedResult(Status.UNSUPPORTED, e.reason)
            return None
        except OpFailed as e:
            self.results[index] = MixedResult(e.status, f"{type(e).__name__}: {e}")
            if e.fatal:
                self.lost, self.selected = str(e), set()
            return None
        finally:
            elapsed = time.perf_counter() - start
            self.target_s += elapsed
            if self.on_op is not None:
                self.on_op()
        self.results[index] = MixedResult(Status.OFFLOADED, target_ms=elapsed * 1e3)
        return outputs

    @property
    def target_seconds(self) -> float:
        """Time spent on the target: runs one at a time and sending/answering pipelined ones."""
        return self.target_s + (self.flight.target_s if self.flight is not None else 0.0)

    def _diverge(self, why: str) -> None:
        if self.diverged is None:
            self.diverged = why
        self.selected = set()
        if self.units is not None:
            self.units.stop()


def offloadable(store: FixtureStore, indices) -> set[int]:
    return {i for i in indices if not skip_reason(store.ops[i])}


def run_step(run: Callable[[], Any], store: FixtureStore, target: Target, selected: set[int], judge: Judge,
             on_op: Callable[[], None] | None = None, units: list | None = None) -> tuple[Any, MixedRun, float]:
    """One live run with ``selected`` ops (and ``units``: ``(UnitCall, UnitSpan)`` pairs) on the target;
    returns (output, mixed run, wall seconds)."""
    chosen = offloadable(store, selected)
    runner = UnitRunner(store, target, judge, units) if units else None
    mixed = MixedRun(store, target, chosen, judge, on_op, runner)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            with mixed.threads:
                try:
                    with mixed:
                        output = run()
                finally:
                    mixed.settle()  # placeholders filled before anyone reads the output; the channel in step
            if runner is not None:
                runner.end()  # a unit the run never finished: its ops on the reference, before anyone reads
    except TapmlError:
        raise  # tapml's own (a store it cannot read, ...): not the model's
    except (Exception, SystemExit) as e:  # the model itself raised: say so, with what it said
        raise ModelRaised(f"{type(e).__name__}: {e}") from e
    for i in chosen - set(mixed.results):  # selected but never reached: say why
        mixed.results[i] = MixedResult(Status.SKIPPED, f"not offloaded: {mixed.diverged}" if mixed.diverged else
                                       "not offloaded: the live run did not reach it")
    return output, mixed, time.perf_counter() - start

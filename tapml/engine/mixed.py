"""Mixed execution: the model runs eagerly on the reference while the ops a step
selects run on the target, and their outputs flow on into the rest of the model.

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
from tapml.core import OpFailed, Status, decode_value, op_info
from tapml.judging import Judge
from tapml.platforms import Target, Unsupported
from tapml.record import Metrics, OpRef

from .localize import skip_reason

__all__ = ["MixedRun", "MixedResult", "flatten_tensors", "run_step"]


@dataclass
class MixedResult:
    """What happened to one selected op in a mixed run."""

    status: Status  # offloaded, fell back, unsupported, crashed, timeout
    reason: str | None = None
    propagated: Metrics | None = None
    target_ms: float | None = None


def flatten_tensors(value) -> list[torch.Tensor]:
    """Tensors in an args/kwargs structure, in the order ``OpCall.inputs`` lists them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_tensors(v)]
    return []


class MixedRun(TorchDispatchMode):
    """Sends the selected carved ops to ``target`` during a live run."""

    def __init__(self, store: FixtureStore, target: Target, selected: set[int], judge: Judge,
                 on_op: Callable[[], None] | None = None):
        super().__init__()
        self.store, self.target, self.judge, self.on_op = store, target, judge, on_op
        self.selected = set(selected)
        self.by_seq = {rec["seq"]: rec for rec in store.ops}
        self.seq = 0
        self.results: dict[int, MixedResult] = {}
        self.diverged: str | None = None
        self.target_s = 0.0
        self.compare_s = 0.0
        self.first_nonfinite: OpRef | None = None
        self.lost: str | None = None  # the target is gone: nothing more was sent this step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.by_seq.get(self.seq)
        self.seq += 1
        if rec is None or rec["index"] not in self.selected:
            return func(*args, **kwargs)
        index = rec["index"]
        if rec["op"] != str(func):
            self._diverge(f"op {index}: the live run called {func} where the carve had {rec['op']}")
            return func(*args, **kwargs)
        live = flatten_tensors([args, kwargs])
        op = self.store.op_call(index)
        if [tuple(t.shape) for t in live] != [s.shape for s in op.inputs]:
            self._diverge(f"op {index} ({rec['op']}): input shapes differ from the carve")
            return func(*args, **kwargs)
        outputs = self._on_target(index, op, live)
        if outputs is None:
            return func(*args, **kwargs)
        start = time.perf_counter()
        want = self.store.outputs(index)
        metrics = self.judge.judge(op, outputs, want, live, oracle=False)  # the oracle is for local errors
        self.compare_s += time.perf_counter() - start
        result = self.results[index]
        result.propagated = metrics
        if metrics.new_nonfinite and self.first_nonfinite is None:
            self.first_nonfinite = OpRef(index, rec["op"], rec["module"])
        if len(outputs) != len(want) or any(o.shape != w.shape for o, w in zip(outputs, want, strict=False)):
            result.status = Status.FELL_BACK  # a wrong shape cannot flow on: the reference result does
            result.reason = metrics.problem or "output count differs"
            return func(*args, **kwargs)
        outputs = [o.to(w.dtype) for o, w in zip(outputs, want, strict=True)]
        info = op_info(func)
        if info.mutated:  # in place / out=: the target's values go into the caller's tensors
            mutated = [args[m] if isinstance(m, int) else kwargs[m] for m in info.mutated]
            targets = flatten_tensors(mutated)
            for dst, src in zip(targets, outputs, strict=False):
                dst.copy_(src)
            outputs = targets
        it = iter(outputs)
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

    def _diverge(self, why: str) -> None:
        if self.diverged is None:
            self.diverged = why
        self.selected = set()


def offloadable(store: FixtureStore, indices) -> set[int]:
    return {i for i in indices if not skip_reason(store.ops[i])}


def run_step(run: Callable[[], Any], store: FixtureStore, target: Target, selected: set[int], judge: Judge,
             on_op: Callable[[], None] | None = None) -> tuple[Any, MixedRun, float]:
    """One live run with ``selected`` ops on the target; returns (output, mixed run, wall seconds)."""
    mixed = MixedRun(store, target, offloadable(store, selected), judge, on_op)
    start = time.perf_counter()
    try:
        with torch.no_grad(), mixed:
            output = run()
    except (Exception, SystemExit) as e:  # the model itself raised: say so, with what it said
        raise ModelRaised(f"{type(e).__name__}: {e}") from e
    return output, mixed, time.perf_counter() - start

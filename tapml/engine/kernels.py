"""Which fused kernel inside a compiled unit went wrong: its outputs matched to carved aten outputs.

Why matching: a compiler's kernels do not map one-to-one onto aten ops (``fused_matmul_add``
is an ``addmm`` and a view; a layer norm may be split). Each kernel output is matched to the
carved tensor of the same shape and dtype closest to it, and judged against that tensor's
float64 value under the end-to-end rule; the first kernel out of bounds is the culprit and the
aten ops between the previous matched tensor and its own are what it covers.
"""

from __future__ import annotations

import torch

from tapml.carving import FixtureStore
from tapml.core import UnitCall
from tapml.judging import Judge
from tapml.platforms import Target, UnitProgram
from tapml.record import Metrics

from .outputs import end_to_end
from .units import UnitSpan, unit_inputs

__all__ = ["first_bad_kernel"]


def first_bad_kernel(store: FixtureStore, target: Target, judge: Judge, unit: UnitCall, span: UnitSpan
                     ) -> tuple[str, list[str], Metrics] | None:
    """(kernel name, the aten ops it covers, its metrics) for the first kernel out of bounds, or None."""
    inputs = unit_inputs(store, unit)
    trace = target.trace_unit(unit, inputs)
    program = UnitProgram(unit, compute=torch.float64, keep=True)
    with torch.no_grad():
        program(*inputs)  # every node widens its float inputs
    carved: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}
    for j, call in enumerate(unit.calls):
        if call.view:
            continue
        for k, t in enumerate(store.outputs(span.first + j)):
            carved.setdefault((tuple(t.shape), t.dtype), []).append((j, k, t))
    last = -1
    for name, outs in trace:
        for out in outs:
            same = carved.get((tuple(out.shape), out.dtype), [])
            if not same:
                continue
            j, k, want = min(same, key=lambda c: float((out.double() - c[2].double()).abs().max())
                             if out.numel() else 0.0)
            exact = program.values[j][k] if len(program.values[j]) > k else None
            m = end_to_end([out], [want], judge, None, [exact] if exact is not None else None)
            if not m.ok:
                covers = [unit.calls[x].op for x in range(last + 1, j + 1) if not unit.calls[x].view]
                return name, covers or [unit.calls[j].op], m
            last = max(last, j)
    return None

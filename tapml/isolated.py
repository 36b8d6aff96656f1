"""The isolated pass: each carved op run on the target with the *reference* inputs.

Its error is the op's *local* error: nothing upstream can have caused it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .carving import FixtureStore
from .platforms import Platform, Unsupported

__all__ = ["isolated_pass", "max_abs_error"]


def max_abs_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got - want|, inf where exactly one side is NaN/Inf or the shapes differ."""
    if got.shape != want.shape:
        return float("inf")
    if not got.numel():
        return 0.0
    if not (got.is_floating_point() or want.is_floating_point()):
        return float((got.long() - want.long()).abs().max().item())
    g, w = got.double(), want.double()
    same = (g == w) | (torch.isnan(g) & torch.isnan(w))
    diff = (g - w).abs().masked_fill(same, 0.0).nan_to_num(nan=float("inf"), posinf=float("inf"))
    return float(diff.max().item())


def isolated_pass(store: FixtureStore, target: Platform, *, indices: Iterable[int] | None = None,
                  on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ops (default: every deterministic one) on ``target``; one result dict per op."""
    results = []
    for i in indices if indices is not None else range(len(store.ops)):
        rec = store.ops[i]
        row = {"index": i, "op": rec["op"], "module": rec["module"], "call": rec["call"],
               "source": rec["source"], "signature": rec["signature"]}
        if rec["nondeterministic"]:
            row.update(status="skipped", reason="nondeterministic on the reference")
        else:
            op = store.op_call(i)
            try:
                support = target.prepare(op)
                if not support:
                    raise Unsupported(support.reason)
                outputs = target.execute(op, store.inputs(i))
                errors = [max_abs_error(g, w) for g, w in zip(outputs, store.outputs(i), strict=True)]
                row.update(status="ran", max_abs_error=max(errors, default=0.0))
            except Unsupported as e:
                row.update(status="unsupported", reason=e.reason)
            except Exception as e:  # a remote failure knows its status; anything else crashed the kernel
                row.update(status=getattr(e, "status", "crashed"), reason=f"{type(e).__name__}: {e}")
        results.append(row)
        if on_result is not None:
            on_result(row)
    return results

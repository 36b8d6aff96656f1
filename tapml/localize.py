"""Localization: the isolated pass, the culprit, its victims, and the random-input check.

The isolated pass runs carved ops on the target with the *reference* inputs
from the store, so an op's error there (its *local* error) is its own. The
*culprit* is the first op in execution order whose local error is out of
tolerance; a *victim* has a fine local error but a bad *propagated* one (its
inputs already came from the target).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .carving import FixtureStore
from .judge import Judge
from .platforms import Platform, TorchPlatform, Unsupported

__all__ = ["local_pass", "run_local", "select_ops", "find_culprit", "find_victims", "random_input_check", "skip_reason",
           "reference_noise", "DRAWS"]

PYTHON_VALUE = "aten._local_scalar_dense.default"


def skip_reason(rec: dict) -> str | None:
    """Why an op is never sent to a target (it stays on the reference by design)."""
    if rec["nondeterministic"]:
        return "nondeterministic on the reference (random or uninitialized output): not comparable"
    if rec["view"]:
        return "view op (no compute): stays on the reference"
    if rec["op"] == PYTHON_VALUE:
        return "returns a Python value: stays on the reference"
    return None


def run_local(store: FixtureStore, target: Platform, judge: Judge, index: int, *, keep_outputs: bool = False) -> dict:
    """One op on the target with the reference inputs: status and local metrics
    (``keep_outputs`` adds the target's tensors under ``"outputs"``, not JSON)."""
    rec = store.ops[index]
    row = {"index": index, "op": rec["op"], "module": rec["module"], "call": rec["call"], "source": rec["source"],
           "signature": rec["signature"], "layer": rec["layer"], "step": rec["step"]}
    why = skip_reason(rec)
    if why:
        row = dict(row, status="skipped", reason=why)
        if rec["nondeterministic"] and not rec["view"]:  # show the reference's own noise, not blame the target
            try:
                row["reference_noise"] = reference_noise(store, index)
            except Exception:
                pass
        return row
    op = store.op_call(index)
    try:
        support = target.prepare(op)
        if not support:
            raise Unsupported(support.reason)
        inputs = store.inputs(index)
        got = target.execute(op, inputs)
    except Unsupported as e:
        return dict(row, status="unsupported", reason=e.reason)
    except Exception as e:  # remote failures carry their status; anything else crashed the kernel
        return dict(row, status=getattr(e, "status", "crashed"), reason=f"{type(e).__name__}: {e}")
    metrics = judge.judge(op, got, store.outputs(index), inputs)
    row = dict(row, status="ok" if metrics["ok"] else "divergent", local=metrics)
    if keep_outputs:
        row["outputs"] = got
    return row


def select_ops(store: FixtureStore, *, all_calls: bool = False, only: str | None = None) -> list[int]:
    """The ops an isolated pass (or a carved test suite) covers: the first call of each
    signature, or every call; ``only`` is a glob on the overload name."""
    import fnmatch

    seen: set[str] = set()
    indices = []
    for rec in store.ops:
        if only and not fnmatch.fnmatchcase(rec["op"], only):
            continue
        if all_calls or rec["signature"] not in seen:
            indices.append(rec["index"])
            seen.add(rec["signature"])
    return indices


def local_pass(store: FixtureStore, target: Platform, judge: Judge, *, indices: Iterable[int] | None = None,
               all_calls: bool = False, on_result: Callable[[dict], None] | None = None) -> dict[int, dict]:
    """The isolated pass over ``indices`` (default: every op, or the first call of each
    signature unless ``all_calls``). Returns rows by op index."""
    if indices is None:
        indices = select_ops(store, all_calls=all_calls)
    rows = {}
    for i in indices:
        rows[i] = run_local(store, target, judge, i)
        if on_result is not None:
            on_result(rows[i])
    return rows


def find_culprit(rows: dict[int, dict]) -> dict | None:
    return next((rows[i] for i in sorted(rows) if rows[i]["status"] == "divergent"), None)


def find_victims(rows: dict[int, dict], propagated: dict[int, dict]) -> list[int]:
    """Ops whose own kernel is fine (locally) but whose chained output is out of tolerance."""
    return [i for i in sorted(propagated)
            if not propagated[i]["ok"] and rows.get(i, {}).get("status") == "ok"]


def reference_noise(store: FixtureStore, index: int) -> float:
    """Max abs difference between two reference runs of one op (0.0 for a deterministic op)."""
    ref = TorchPlatform()
    op = store.op_call(index)
    a = ref.execute(op, store.inputs(index))
    b = ref.execute(op, store.inputs(index))
    return max((float((x.double() - y.double()).abs().nan_to_num(0.0).max()) if x.numel() else 0.0)
               for x, y in zip(a, b, strict=True)) if a else 0.0


DRAWS = {
    "normal(0,1)": lambda shape, g: torch.randn(shape, generator=g),
    "uniform(0,1)": lambda shape, g: torch.rand(shape, generator=g),
    "uniform(-1,1)": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1,
}


def random_input_check(store: FixtureStore, target: Platform, judge: Judge, index: int) -> dict:
    """Would random inputs of the same shapes have revealed this op's fault?

    Float inputs are drawn from common distributions; integer and bool inputs
    (indices, masks) keep their recorded values so the op stays valid.
    """
    op = store.op_call(index)
    recorded = store.inputs(index)
    reference = TorchPlatform()
    g = torch.Generator().manual_seed(0)
    draws = []
    for name, draw in DRAWS.items():
        inputs = [draw(t.shape, g).to(t.dtype) if t.is_floating_point() else t for t in recorded]
        try:
            want = reference.execute(op, inputs)
            got = target.execute(op, inputs)
            m = judge.judge(op, got, want)
            draws.append({"draw": name, "ok": m["ok"], "max_abs": m["max_abs"]})
        except Exception as e:
            draws.append({"draw": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
    revealed = any(not d["ok"] for d in draws)
    return {"draws": draws, "revealed": revealed,
            "summary": ("random inputs also reveal it" if revealed else
                        "random inputs would have missed it: only the realistic (carved) inputs reveal the fault")}

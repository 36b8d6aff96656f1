"""Replay carved ops on the reference and check they reproduce bit-exactly.

Why: every later comparison trusts the store; if the reference cannot reproduce
its own recording from it (a lost stride, a wrong dtype), nothing built on it
can be trusted either.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from tapml.core import Opaque, OpRefused, place_device, resolve_op
from tapml.core import decode_value as decode

from .layout import tensor_key
from .store import FixtureStore, StoreError

__all__ = ["run_op", "replay", "ReplayReport", "Mismatch"]


def run_op(store: FixtureStore, rec: dict) -> Any:
    """Run one carved op on the reference with its recorded inputs."""
    func = resolve_op(rec["op"], rec.get("library") or "")
    args = decode(rec["args"], store.load)
    kwargs = place_device(decode(rec["kwargs"], store.load), "cpu")  # the store loads to the CPU
    return func(*args, **kwargs)


@dataclass
class Mismatch:
    index: int
    op: str
    module: str
    reason: str


@dataclass
class ReplayReport:
    checked: int = 0
    skipped: int = 0  # nondeterministic ops: random or uninitialized outputs
    mismatches: list[Mismatch] = field(default_factory=list)
    noisy: list[Mismatch] = field(default_factory=list)  # the reference disagrees with itself: not a mismatch

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def fidelity(self) -> float:
        checked = self.checked - len(self.noisy)
        return 1.0 if not checked else (checked - len(self.mismatches)) / checked


def _differs(expected: Any, got: Any, store: FixtureStore) -> str | None:
    """Why ``got`` is not the recorded value, or None when bit-identical."""
    if isinstance(expected, dict) and "tensor" in expected:
        ref = expected["tensor"]
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor, got {type(got).__name__}"
        if list(got.shape) != ref["shape"] or str(got.dtype).removeprefix("torch.") != ref["dtype"]:
            return f"expected {ref['dtype']}{ref['shape']}, got {got.dtype}{list(got.shape)}"
        if tensor_key(got) == ref["key"]:
            return None
        want = store.load(ref)
        if got.is_floating_point():
            err = (got.double() - want.double()).abs().nan_to_num(nan=float("inf")).max().item()
            return f"bytes differ (max abs diff {err:.3g})"
        return "bytes differ"
    if isinstance(expected, dict) and "tuple" in expected:
        expected = expected["tuple"]
    if isinstance(expected, list):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"expected {len(expected)} outputs"
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            why = _differs(e, g, store)
            if why:
                return f"output {i}: {why}"
        return None
    decoded = decode(expected, store.load)
    return None if decoded == got else f"expected {decoded!r}, got {got!r}"


def replay(store: FixtureStore, indices: Iterable[int] | None = None) -> ReplayReport:
    """Replay deterministic ops from the store and compare with what was recorded."""
    report = ReplayReport()
    ops = store.ops if indices is None else [store.ops[i] for i in indices]
    with torch.no_grad():
        for rec in ops:
            if rec["nondeterministic"]:
                report.skipped += 1
                continue
            report.checked += 1
            try:
                got = run_op(store, rec)
                why = _differs(rec["outputs"], got, store)
            except StoreError:
                raise  # the store is damaged: an error about the store, not a replay mismatch
            except OpRefused as e:
                why = f"refused: {e}"
            except Opaque as e:
                why = str(e)
            except Exception as e:  # the reference itself failed on the recorded inputs
                why = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if why and "bytes differ" in why and _differs_from_itself(store, rec):
                report.noisy.append(Mismatch(rec["index"], rec["op"], rec["module"],
                                             f"the reference is nondeterministic here: {why}"))
            elif why:
                report.mismatches.append(Mismatch(rec["index"], rec["op"], rec["module"], why))
    return report


def _differs_from_itself(store: FixtureStore, rec: dict) -> bool:
    """Two reference runs of the same op on the same inputs disagree (e.g. LAPACK's gelsy)."""
    a, b = run_op(store, rec), run_op(store, rec)
    flat = [t for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
    other = [t for t in (b if isinstance(b, (list, tuple)) else [b]) if isinstance(t, torch.Tensor)]
    return any(tensor_key(x) != tensor_key(y) for x, y in zip(flat, other, strict=False))

"""What a fixture store holds, as plain data (the CLI renders it)."""

from __future__ import annotations

from collections import Counter

from .carving import FixtureStore, ReplayReport
from .core import iter_specs as iter_tensor_refs

__all__ = ["summarize"]


def summarize(store: FixtureStore, *, verified: bool, replay: ReplayReport | None = None) -> dict:
    ops = store.ops
    refs = [r for op in ops for part in ("args", "kwargs", "outputs") for r in iter_tensor_refs(op[part])]
    m = store.manifest
    summary = {
        "path": str(store.path),
        "schema": m["schema"],
        "model": m["model"],
        "reference": store.reference,
        "versions": m["versions"],
        "ops": len(ops),
        "compute_ops": sum(1 for op in ops if not op["view"]),
        "view_ops": sum(1 for op in ops if op["view"]),
        "nondeterministic_ops": sum(1 for op in ops if op["nondeterministic"]),
        "layers": len(store.layers),
        "steps": [{"name": s["name"], "ops": s["ops"][1] - s["ops"][0]} for s in store.steps],
        "unique_signatures": len({op["signature"] for op in ops}),
        "op_types": dict(Counter(op["op"] for op in ops).most_common()),
        "tensors": len(store.tensors),
        "tensor_uses": len(refs),
        "stored_bytes": store.stored_bytes,
        "unique_tensor_bytes": store.unique_tensor_bytes,
        "referenced_bytes": m["stats"].get("bytes_referenced", 0),
        "truncated": m["truncated"],
        "verified": verified,
    }
    if replay is not None:
        summary["replay"] = {"checked": replay.checked, "skipped_nondeterministic": replay.skipped,
                             "fidelity": replay.fidelity, "mismatches": [vars(m) for m in replay.mismatches],
                             "reference_nondeterministic": [vars(m) for m in replay.noisy]}
    return summary

"""Per-module errors as a Google Model Explorer node-data overlay (``GraphNodeData`` JSON).

Model Explorer colours a graph's nodes from a JSON file of ``results`` keyed by
node id; for a PyTorch model its nodes are grouped by module path, so the keys
here are module paths (``encoder.layer.3.intermediate``) and each value is the
worst local error under that module: the bound ratio (above 1 is out of bounds)
when the run was judged by the bound, else the max abs error.
"""

from __future__ import annotations

import math

from tapml.record import Run

from .tree import ops_tree

__all__ = ["model_explorer_data"]

_FINITE_MAX = 1e30  # JSON has no inf: a non-finite error is shown as this


def model_explorer_data(record: Run) -> dict:
    """The overlay: ``results`` per module path, and ``thresholds`` that colour within/beyond the limit."""
    limit = 1.0 if record.rule == "bound" else None
    if limit is None:
        tol = next((o.tolerance for o in record.ops if o.tolerance is not None), None)
        limit = tol.atol if tol is not None else 1e-5
    results = {}
    for node in ops_tree(record.ops).walk():
        if node.path and node.worst is not None:
            value = node.worst if math.isfinite(node.worst) else _FINITE_MAX
            results[node.path] = {"value": value}
    return {"results": results,
            "thresholds": [{"value": limit, "bgColor": "#c8e6c9"}, {"value": _FINITE_MAX, "bgColor": "#ef9a9a"}]}


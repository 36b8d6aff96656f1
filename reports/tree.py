"""The model as a tree of module paths (model → layers → modules), each node with its worst status and error.

Why generic: a node is just a dotted path with the items under it, so anything
that carries a module path (ops today, compiled units later) aggregates the same
way — the view Model Explorer users expect, and the keys of its node-data overlay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from .run import number

__all__ = ["TreeNode", "module_tree", "ops_tree", "measured_rows", "error_value", "SEVERITY"]

# how bad a status is, worst last: a node shows the worst status under it
SEVERITY = ("skipped", "ok", "unsupported", "timeout", "crashed", "divergent")


def error_value(o) -> float | None:
    """The number a node aggregates for an op: its local bound ratio (1 is the bound) when judged by the
    bound, else its local max abs error; None when it was not measured."""
    m = o.local
    if m is None:
        return None
    if m.bound is not None:
        return number(m.bound.ratio)
    return number(m.max_abs)


@dataclass
class TreeNode:
    """One module path and everything recorded under it (its own ops and its descendants')."""

    path: str
    name: str
    children: dict[str, TreeNode] = field(default_factory=dict)
    items: int = 0  # ops (or units) at or below this node
    counts: dict[str, int] = field(default_factory=dict)  # status → how many at or below
    worst: float | None = None
    worst_index: int | None = None  # the op (or unit) with that error
    first: int | None = None  # the first op index under it, for linking into the op table

    @property
    def status(self) -> str:
        return max(self.counts, key=SEVERITY.index, default="skipped")

    def add(self, status: str, value: float | None, index: int) -> None:
        self.items += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        if self.first is None or index < self.first:
            self.first = index
        if value is not None and (self.worst is None or _worse(value, self.worst)):
            self.worst, self.worst_index = value, index

    def walk(self) -> Iterable[TreeNode]:
        yield self
        for c in self.children.values():
            yield from c.walk()


def _worse(a: float, b: float) -> bool:
    return (math.isnan(a) and not math.isnan(b)) or a > b


def module_tree(items: Iterable[tuple[str, str, float | None, int]], root: str = "(model)") -> TreeNode:
    """A tree from ``(module path, status, error, index)`` items; every dotted prefix is a node."""
    top = TreeNode("", root)
    for path, status, value, index in items:
        node = top
        node.add(status, value, index)
        parts = path.split(".") if path else []
        for k in range(len(parts)):
            prefix = ".".join(parts[:k + 1])
            node = node.children.setdefault(prefix, TreeNode(prefix, parts[k]))
            node.add(status, value, index)
    return top


def measured_rows(ops: list) -> dict[int, object]:
    """For a later call whose signature was measured on an earlier call (the isolated pass runs each
    signature once): that earlier call's row, whose local error stands for it."""
    first: dict[str, object] = {}
    out = {}
    for o in ops:
        if o.local is not None:
            first.setdefault(o.signature, o)
        elif o.signature in first:
            out[o.index] = first[o.signature]
    return out


def ops_tree(ops: list) -> TreeNode:
    """The tree of a run's ops (``OpRow``s): status and local error per module path, a later call of a
    signature counting with the error measured on its first call."""
    measured = measured_rows(ops)
    return module_tree((o.module, str(o.status), error_value(measured.get(o.index, o)), o.index) for o in ops)

"""A carved run's data flow read back from a store: who consumes what, what is live, what reaches the outputs.

Why: victims of a fault are what its outputs reach, not what happens to run after it; an
output no one reads is dead and cannot explain anything downstream (``dataflow`` records
the edges while carving).
"""

from __future__ import annotations

__all__ = ["Graph"]


class Graph:
    """A carved run's data flow, read back from the store: who consumes what, what is live."""

    def __init__(self, n_ops: int, edges: list[list[int]] | None, outputs: list | None,
                 flow: list[list[int]] | None = None, returns: list | None = None):
        self.known = edges is not None
        self.flow: dict[int, dict[int, tuple[int, int]]] = {}  # consumer -> input position -> (op, slot) object
        self.uses: dict[tuple[int, int], int] = {}  # how many reads of each op output object (then free it)
        for i, k, j, p in flow or []:
            self.flow.setdefault(j, {})[p] = (i, k)
            self.uses[(i, k)] = self.uses.get((i, k), 0) + 1
        self.returns = [tuple(o) if o is not None else None for o in returns or []]
        self.consumers: dict[tuple[int, int], list[int]] = {}
        self.inputs: dict[int, dict[int, tuple[int, int]]] = {}  # consumer -> input position -> (op, slot)
        self._next: dict[int, set[int]] = {}  # op -> the ops that read any of its outputs
        for i, k, j, p in edges or []:
            self.consumers.setdefault((i, k), []).append(j)
            self.inputs.setdefault(j, {})[p] = (i, k)
            self._next.setdefault(i, set()).add(j)
        self.model_outputs = [tuple(o) if o is not None else None for o in outputs or []]
        self._returned = {o for o in self.model_outputs if o is not None}
        self.n_ops = n_ops

    def live(self, op: int, slot: int) -> bool:
        """Whether an op's output is read by a later op or returned by the model (True when unknown)."""
        return not self.known or (op, slot) in self.consumers or (op, slot) in self._returned

    def downstream(self, op: int) -> set[int]:
        """Every op that its outputs reach, directly or through others."""
        seen, todo = set(), [op]
        while todo:
            for j in self._next.get(todo.pop(), ()):
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen

    def reaches_output(self, op: int) -> bool:
        """Whether what the op produces flows into a model output (True when the flow is unknown)."""
        if not self.known or not self.model_outputs:
            return True
        ends = {o[0] for o in self.model_outputs if o is not None}
        return op in ends or bool(self.downstream(op) & ends)

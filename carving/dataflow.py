"""Data flow: which op produced the memory each op reads (producer → consumer edges).

Why: victims of a fault are what its outputs reach, not what happens to run after it;
an output no one reads is dead and cannot explain anything downstream; a float64
replay of the carved graph follows these edges. The tracer sees every tensor an op
reads and writes: each write is keyed by its storage and the storage's version
counter, so a later read of that storage at that version consumed it (views share
both with their base, so reading a view links to whoever wrote the base).
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["DataFlow", "Graph"]


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


class DataFlow:
    """Edges ``[producer op, output slot, consumer op, input position]`` as the run goes.

    Two kinds: ``edges`` follow memory (a read of a view links to whoever wrote its base:
    what liveness and victims need), ``flow`` follows tensor objects (a read of a view links
    to the view op that made it: what a replay of the carved graph needs)."""

    def __init__(self) -> None:
        self._writer: dict[int, tuple[int, int, weakref.ref, int]] = {}
        self._made: dict[int, tuple[int, int, weakref.ref]] = {}  # id(tensor) -> the op output it is
        self.edges: list[list[int]] = []
        self.flow: list[list[int]] = []

    def _producer(self, t: torch.Tensor) -> tuple[int, int] | None:
        if not isinstance(t, torch.Tensor) or not t.numel() or t.layout != torch.strided:
            return None
        hit = self._writer.get(t.untyped_storage().data_ptr())
        if hit is None or hit[2]() is None or hit[3] != _version(t):
            return None  # not written by a recorded op (a weight, an input), or written since
        return hit[0], hit[1]

    def _maker(self, t) -> tuple[int, int] | None:
        hit = self._made.get(id(t))
        return (hit[0], hit[1]) if hit is not None and hit[2]() is t else None

    def read(self, op: int, tensors: list) -> None:
        for p, t in enumerate(tensors):
            producer = self._producer(t)
            if producer is not None:
                self.edges.append([producer[0], producer[1], op, p])
            maker = self._maker(t)
            if maker is not None:
                self.flow.append([maker[0], maker[1], op, p])

    def made(self, op: int, tensors: list) -> None:
        """Every tensor object an op returned, views included."""
        for k, t in enumerate(tensors):
            if isinstance(t, torch.Tensor):
                self._made[id(t)] = (op, k, weakref.ref(t))

    def wrote(self, op: int, tensors: list, mutated: set[int] | None = None) -> None:
        """``mutated``: slots written in place, whose version counter ATen bumps only after the
        dispatch mode returns (so the version a later reader sees is one more)."""
        for k, t in enumerate(tensors):
            if isinstance(t, torch.Tensor) and t.numel() and t.layout == torch.strided:
                bump = 1 if mutated and k in mutated and _version(t) >= 0 else 0
                self._writer[t.untyped_storage().data_ptr()] = (op, k, weakref.ref(t.untyped_storage()),
                                                                 _version(t) + bump)

    def producers(self, tensors: list) -> list[list[int] | None]:
        """For each tensor, ``[op, slot]`` of the op that wrote it last, or None."""
        return [list(p) if (p := self._producer(t)) is not None else None for t in tensors]

    def makers(self, tensors: list) -> list[list[int] | None]:
        """For each tensor object, ``[op, slot]`` of the op that returned it, or None."""
        return [list(m) if (m := self._maker(t)) is not None else None for t in tensors]


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

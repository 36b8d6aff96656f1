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
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .objects import Entry

__all__ = ["DataFlow"]


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


class DataFlow:
    """Edges ``producer op, output slot, consumer op, input position`` as the run goes (flat lists).

    Two kinds: ``edges`` follow memory (a read of a view links to whoever wrote its base:
    what liveness and victims need), ``flow`` follows tensor objects (a read of a view links
    to the view op that made it: what a replay of the carved graph needs). Tensors arrive as
    the tracer's ``Entry``s, which already know their storage, version and maker."""

    def __init__(self) -> None:
        self.written: dict[int, tuple[int, int, weakref.ref, int]] = {}  # storage ptr -> (op, slot, storage, version)
        self.edges: list[int] = []  # flat, 4 per edge (the manifest's form)
        self.flow: list[int] = []

    def read(self, op: int, position: int, e: Entry) -> None:
        """Op ``op`` reads the tensor ``e`` as its input ``position``."""
        if e.maker is not None:
            self.flow += (e.maker[0], e.maker[1], op, position)
        if e.storage is not None:
            hit = self.written.get(e.storage)
            if hit is not None and hit[3] == e.now and hit[2]() is not None:
                self.edges += (hit[0], hit[1], op, position)

    def wrote(self, op: int, slot: int, t: torch.Tensor, e: Entry, mutated: bool) -> None:
        """Op ``op`` wrote ``t`` (its output ``slot``). ``mutated``: written in place, whose version counter
        ATen bumps only after the dispatch mode returns (so the version a later reader sees is one more)."""
        if e.storage is not None:
            self.written[e.storage] = (op, slot, weakref.ref(t.untyped_storage()),
                                       e.now + (1 if mutated and e.now >= 0 else 0))

    def producers(self, tensors: list) -> list[list[int] | None]:
        """For each tensor, ``[op, slot]`` of the op that wrote it last, or None."""
        out = []
        for t in tensors:
            hit = None
            if isinstance(t, torch.Tensor) and t.numel() and t.layout == torch.strided:
                hit = self.written.get(t.untyped_storage().data_ptr())
                if hit is not None and (hit[2]() is None or hit[3] != _version(t)):
                    hit = None  # not written by a recorded op (a weight, an input), or written since
            out.append([hit[0], hit[1]] if hit is not None else None)
        return out

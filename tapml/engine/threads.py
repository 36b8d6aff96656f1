"""The client's own work at one torch thread while a pipelined worker runs the target's kernels.

On a machine whose cores the client shares with its worker, every OpenMP parallel region the client
opens (a placeholder fill, a copy, a comparison on torch) needs all of its team on a core at once:
with the worker's kernels busy on them, the region waits for a time slice, and libgomp's default
wait policy then spins the client's idle thread for milliseconds on the core the worker needs.
tapml's own work is small per op, so it runs on one thread; the reference's ops still run with the
thread count the run began with, so they repeat the carve bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

__all__ = ["OwnThreads"]


class OwnThreads:
    """Context: one intra-op thread inside (when ``active`` and the caller had more); ``reference(fn, ...)``
    calls ``fn`` at the caller's count — the count when this was made (a model that changes it mid-run is
    overridden at its next reference op)."""

    def __init__(self, active: bool):
        self.reference_threads = torch.get_num_threads()
        self.active = active and self.reference_threads > 1
        self.inside = False

    def __enter__(self) -> OwnThreads:
        if self.active:
            self.inside = True  # first: an interrupt between the two still finds __exit__'s restore armed
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.inside:
            self.inside = False
            torch.set_num_threads(self.reference_threads)

    def reference(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` (a reference op) at the thread count the run began with."""
        if not self.inside:
            return fn(*args)
        torch.set_num_threads(self.reference_threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(1)

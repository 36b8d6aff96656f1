"""Giving memory the program freed back to the system between the steps of a long run.

Why: glibc serves allocations below its mmap threshold from the heap, and that threshold rises to the
size of every large block freed (up to 32 MiB). At scale the isolated pass loads, judges and frees
tensors of tens of MiB per op; the freed blocks stayed in the client's RSS and piled up (290M
parameters: +190 MiB of free heap by ``lm_head``'s op, a peak of +377 MiB over the client's start;
trimmed after each op that moved ``TRIM_AFTER`` bytes: +27 and +156 MiB, 0.2 s for 347 trims).
``malloc_trim`` hands the free pages back; without glibc this does nothing.
"""

from __future__ import annotations

import ctypes

__all__ = ["TRIM_AFTER", "HeapTrimmer"]

TRIM_AFTER = 4 << 20  # bytes moved since the last trim: below this, a trim costs more than it returns


def _malloc_trim():
    """glibc's ``malloc_trim`` from the process's own symbols (no ``find_library``: it runs ldconfig), or
    None without glibc (macOS, musl)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


_TRIM = _malloc_trim()


class HeapTrimmer:
    """Count the bytes a run moves; trim the heap once they reach ``TRIM_AFTER``."""

    def __init__(self) -> None:
        self._moved = 0

    def moved(self, nbytes: int) -> None:
        self._moved += nbytes
        if self._moved >= TRIM_AFTER:
            self.trim()

    def trim(self) -> None:
        """Hand the free pages back now (a phase that freed much is over)."""
        if _TRIM is not None:
            _TRIM(0)
        self._moved = 0

"""What the cheap comparison tier reads besides the two tensors: NumPy views of them, and the carved
side's NaN/Inf counts, cached per content.

Why a cache: a per-op offload judges every offloaded op's outputs against the carve, and the
carved outputs are immutable, read from the store, where ``mark_content`` names each one by its
content key and layout. Whether such a tensor is all finite (and how many NaNs and Infs it holds)
is a function of that name, so it is computed once per content, not once per read: no
invalidation is needed, a mark names one content forever. The cache is bounded (oldest first out).

Why NumPy: on the CPU its comparisons and reductions run one vectorized pass at a fraction of
torch's per-call overhead (``(a == b).all()`` on 27k float32s: ~3 µs against torch.equal's 12).
Without NumPy, or for a dtype it lacks, callers take the torch path.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from tapml.core import make_room

try:
    import numpy as np
except ImportError:  # torch alone: every comparison takes the torch path
    np = None

__all__ = ["arrays", "nonfinite_counts", "clear", "np", "LIMIT"]

LIMIT = 1 << 15  # cached contents (one small tuple each)
_COUNTS: dict[Hashable, tuple[int, int]] = {}
_NUMPY = frozenset({torch.float16, torch.float32, torch.float64, torch.bool, torch.uint8, torch.int8, torch.int16,
                    torch.int32, torch.int64})


def arrays(got: torch.Tensor, want: torch.Tensor):
    """``(got, want)`` as NumPy arrays sharing their memory (bfloat16 widened to float32, exactly), or
    None where the torch path must judge: no NumPy, another dtype or device, a conjugate view, ..."""
    if np is None or got.dtype != want.dtype:
        return None
    try:
        if want.dtype in _NUMPY:
            return got.numpy(), want.numpy()
        if want.dtype == torch.bfloat16:  # every bfloat16 is a float32: the same order, the same differences
            return got.float().numpy(), want.float().numpy()
    except (RuntimeError, TypeError):  # on a GPU, requires grad, a conjugate or negative view
        pass
    return None


def nonfinite_counts(want: torch.Tensor, array=None, mark: Hashable | None = None) -> tuple[int, int]:
    """(NaN count, Inf count) of ``want``; ``array``: its NumPy view, ``mark``: its content mark (the
    counts are then remembered for every later read of that content)."""
    if not want.is_floating_point():
        return 0, 0
    hit = _COUNTS.get(mark) if mark is not None else None
    if hit is not None:
        return hit
    finite = bool(np.isfinite(array).all()) if array is not None else bool(torch.isfinite(want).all())
    counts = (0, 0) if finite else (int(torch.isnan(want).sum()), int(torch.isinf(want).sum()))
    if mark is not None:
        make_room(_COUNTS, LIMIT)
        _COUNTS[mark] = counts
    return counts


def clear() -> None:
    """Forget every cached count (a benchmark's first-forward case; never needed for correctness)."""
    _COUNTS.clear()

"""A contraction evaluated in float64 one block of output columns at a time.

Why: the bound rule's exact result and its |A|·|B| term run the op on widened
inputs, and a weight widened whole is 4× its bfloat16 bytes (``lm_head`` at 1.1B
parameters: 500 MiB, twice over). Its output columns depend on its columns alone,
so the widened weight is taken a block at a time: each block widened, multiplied,
written into the result and dropped — at most ``BLOCK_BYTES`` of it at once.

Only a weight whose widened copy exceeds ``BLOCK_BYTES`` is split, so every
smaller op's float64 result stays bit-for-bit what one call gives. A split one
differs from the unsplit call in its last bits (MKL picks another kernel or
summation order for another width: ~1e-13 relative, measured), far below any
float32 or bfloat16 bound; block edges depend on shapes alone, so results are
deterministic run to run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tapml.core import OpCall

__all__ = ["BLOCK_BYTES", "call_widened"]

BLOCK_BYTES = 8 << 20  # an eighth of a store shard of widened weight at a time (16 MiB set a 1.1B peak)

# overload → (position of the operand whose columns are the output's, its column dim, positions of biases
# added along the output's columns): aten's own argument order
_SPLITS = {"mm": (1, -1, ()), "bmm": (1, -1, ()), "matmul": (1, -1, ()), "addmm": (2, -1, (0,)),
           "baddbmm": (2, -1, (0,)), "linear": (1, 0, (2,))}


def call_widened(op: OpCall, args: list, kwargs: dict, widen: Callable) -> Any:
    """``op.func(*widen(args), **widen(kwargs))``, by column blocks where the widened weight would exceed
    ``BLOCK_BYTES``. ``widen`` maps a (nested) argument into float64."""
    cols = _split(op, args)
    if cols is None:
        return op.func(*widen(args), **widen(kwargs))
    pos, dim, biases = cols
    n = args[pos].shape[dim]
    width = max(1, BLOCK_BYTES // max(8 * args[pos].numel() // n, 1))
    out = None
    for start in range(0, n, width):
        end = min(start + width, n)
        part = list(args)
        part[pos] = args[pos].narrow(dim, start, end - start)
        for b in biases:
            if b < len(args) and _along(args[b], n):
                part[b] = args[b].narrow(-1, start, end - start)
        block = op.func(*widen(part), **widen(kwargs))
        if out is None:
            out = block.new_empty((*block.shape[:-1], n))
        out[..., start:end] = block
        del block
    return out


def _split(op: OpCall, args: list) -> tuple[int, int, tuple[int, ...]] | None:
    """Where to split (operand, its column dim, biases), or None: a small operand, another op, an ``out=``."""
    parts = op.op.split(".")
    if len(parts) != 3 or parts[2] != "default" or parts[1] not in _SPLITS:
        return None
    pos, dim, biases = _SPLITS[parts[1]]
    w = args[pos] if pos < len(args) else None
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() < 2 or w.numel() * 8 <= BLOCK_BYTES:
        return None
    if parts[1] == "matmul" and (not isinstance(args[0], torch.Tensor) or args[0].dim() < 1):
        return None
    if any(b < len(args) and isinstance(args[b], torch.Tensor) and args[b].dim() > 1
           and args[b].shape[-1] not in (1, w.shape[dim]) for b in biases):
        return None  # a bias this split does not understand: evaluate whole
    return pos, dim, biases


def _along(bias, n: int) -> bool:
    """A bias with one value per output column (not one broadcast over them)."""
    return isinstance(bias, torch.Tensor) and bias.dim() >= 1 and bias.shape[-1] == n and n > 1

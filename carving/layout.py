"""Tensor layout: the canonical bytes a tensor is stored as, and its exact rebuild.

Why: a transposed weight (``aten.t``) and the weight itself hold the same bytes;
storing every tensor in *storage order* makes them one stored tensor. Replay must
be bit-exact, and some kernels take different paths for different strides, so
each use keeps its shape, strides and storage offset and is rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tapml.core import (
    TensorSpec,
    broadcast_narrowed,
    content_key,
    dtype_from_name,
    dtype_name,
    relayout,
    storage_order,
)

__all__ = ["TensorRef", "canonical", "content_key", "materialize", "dtype_name", "dtype_from_name"]


@dataclass(frozen=True)
class TensorRef:
    """One use of a stored tensor: which bytes, and how they were laid out."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    exact: bool  # False when the layout overlapped itself and is rebuilt contiguous

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.dtype, self.shape, self.stride, self.offset, self.exact)

    def to_json(self) -> dict:
        return {"key": self.key, **self.spec.to_json()}

    @classmethod
    def from_json(cls, obj: dict) -> TensorRef:
        spec = TensorSpec.from_json(obj)
        return cls(obj["key"], spec.dtype, spec.shape, spec.stride, spec.offset, spec.exact)


def _overlaps(shape, stride) -> bool:
    span = 1
    for d in reversed(storage_order(shape, stride)):
        if shape[d] == 1:
            continue
        if stride[d] < span:
            return True
        span = stride[d] * shape[d]
    return False


def canonical(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The tensor's elements in storage order as a flat tensor (a view when possible).

    Returns ``(flat, exact)``; ``exact`` is False for self-overlapping layouts,
    which are stored in logical order instead.
    """
    shape, stride = tuple(t.shape), tuple(t.stride())
    if t.is_contiguous():
        return t.reshape(-1), True
    narrow = broadcast_narrowed(shape, stride)
    if narrow != shape:
        t = t.as_strided(narrow, stride, t.storage_offset())
    if _overlaps(narrow, stride):
        return t.contiguous().reshape(-1), False
    flat = t.permute(storage_order(narrow, stride)).reshape(-1)
    # a strided 1-D result (gaps between elements) is still a view: the bytes must be packed
    return (flat if flat.is_contiguous() else flat.contiguous()), True


def materialize(flat: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    """Rebuild the tensor a ref describes, with its exact strides and offset."""
    if not ref.exact:
        return flat.reshape(ref.shape).clone()
    narrow = broadcast_narrowed(ref.shape, ref.stride)
    order = storage_order(narrow, ref.stride)
    logical = flat.reshape([narrow[d] for d in order]).permute(_inverse(order))
    return relayout(logical.expand(ref.shape), ref.spec)


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv

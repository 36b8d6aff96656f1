"""Tensor layout: the canonical bytes a tensor is stored as, and its exact rebuild.

Why: a transposed weight (``aten.t``) and the weight itself hold the same bytes;
storing every tensor in *storage order* makes them one stored tensor. Replay must
be bit-exact, and some kernels take different paths for different strides, so
each use keeps its shape, strides and storage offset and is rebuilt exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

__all__ = ["TensorRef", "canonical", "content_key", "materialize", "dtype_name", "dtype_from_name"]


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


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
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def to_json(self) -> dict:
        out = {"key": self.key, "dtype": self.dtype, "shape": list(self.shape), "stride": list(self.stride)}
        if self.offset:
            out["offset"] = self.offset
        if not self.exact:
            out["exact"] = False
        return out

    @classmethod
    def from_json(cls, obj: dict) -> TensorRef:
        return cls(
            key=obj["key"],
            dtype=obj["dtype"],
            shape=tuple(obj["shape"]),
            stride=tuple(obj["stride"]),
            offset=int(obj.get("offset", 0)),
            exact=bool(obj.get("exact", True)),
        )


def _storage_order(shape: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """Dims from outermost to innermost in memory; ties keep dim order."""
    return sorted(range(len(shape)), key=lambda d: (-stride[d], d))


def _narrowed(shape, stride):
    """Broadcast dims (stride 0) hold one element's worth of bytes."""
    return tuple(1 if st == 0 else sz for sz, st in zip(shape, stride, strict=True))


def _overlaps(shape, stride) -> bool:
    span = 1
    for d in reversed(_storage_order(shape, stride)):
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
    narrow = _narrowed(shape, stride)
    if narrow != shape:
        t = t.as_strided(narrow, stride, t.storage_offset())
    if _overlaps(narrow, stride):
        return t.contiguous().reshape(-1), False
    return t.permute(_storage_order(narrow, stride)).reshape(-1), True


def content_key(flat: torch.Tensor) -> str:
    """Content hash of a flat contiguous tensor: its bytes and dtype (shape lives in refs)."""
    h = hashlib.sha256(dtype_name(flat.dtype).encode())
    h.update(b"\0")
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()[:40]


def materialize(flat: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    """Rebuild the tensor a ref describes, with its exact strides and offset."""
    shape, stride = ref.shape, ref.stride
    if not ref.exact:
        return flat.reshape(shape).clone()
    narrow = _narrowed(shape, stride)
    order = _storage_order(narrow, stride)
    logical = flat.reshape([narrow[d] for d in order]).permute(_inverse(order))
    extent = 1 + sum((sz - 1) * st for sz, st in zip(narrow, stride, strict=True)) if logical.numel() else 0
    buf = torch.empty(ref.offset + extent, dtype=flat.dtype)
    out = buf.as_strided(narrow, stride, ref.offset)
    out.copy_(logical)
    if narrow != shape:
        out = out.expand(shape)
    return out


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv

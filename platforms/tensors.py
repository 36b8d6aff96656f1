"""How a tensor is described to a platform, and how to lay one out exactly as described.

Why exact layout: some CPU kernels take different paths for a transposed or
offset operand, so the identity target reproduces the reference bit for bit
only when every input has the strides and storage offset it had when carved.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import xxhash

__all__ = ["TensorSpec", "relayout", "dtype_name", "dtype_from_name", "storage_order", "broadcast_narrowed",
           "content_key", "HashMemo"]

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
class TensorSpec:
    """A tensor as an op saw it: dtype, shape, strides, storage offset."""

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0
    exact: bool = True  # False when the recorded layout overlapped itself

    @classmethod
    def from_json(cls, obj: dict) -> TensorSpec:
        return cls(obj["dtype"], tuple(obj["shape"]), tuple(obj["stride"]), int(obj.get("offset", 0)),
                   bool(obj.get("exact", True)))

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(dtype_name(t.dtype), tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def to_json(self) -> dict:
        out = {"dtype": self.dtype, "shape": list(self.shape), "stride": list(self.stride)}
        if self.offset:
            out["offset"] = self.offset
        if not self.exact:
            out["exact"] = False
        return out

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


def storage_order(shape, stride) -> list[int]:
    """Dims from outermost to innermost in memory; ties keep dim order."""
    return sorted(range(len(shape)), key=lambda d: (-stride[d], d))


def broadcast_narrowed(shape, stride) -> tuple[int, ...]:
    """Broadcast dims (stride 0) hold one element's worth of memory."""
    return tuple(1 if st == 0 else sz for sz, st in zip(shape, stride, strict=True))


def relayout(t: torch.Tensor, spec: TensorSpec, *, copy: bool = True) -> torch.Tensor:
    """``t`` (any layout, logical shape ``spec.shape``) in exactly ``spec``'s layout.

    With ``copy=False`` a tensor already laid out so is returned as is (callers
    that will not write into it save a copy)."""
    if not copy and tuple(t.stride()) == spec.stride and t.storage_offset() == spec.offset:
        return t
    if not spec.exact:
        return t.contiguous()
    narrow = broadcast_narrowed(spec.shape, spec.stride)
    if narrow != spec.shape:
        t = t[tuple(slice(0, 1) if n == 1 and s != 1 else slice(None) for n, s in zip(narrow, spec.shape,
                                                                                       strict=True))]
    extent = 1 + sum((sz - 1) * st for sz, st in zip(narrow, spec.stride, strict=True)) if t.numel() else 0
    buf = torch.empty(spec.offset + extent, dtype=t.dtype, device=t.device)
    out = buf.as_strided(narrow, spec.stride, spec.offset)
    out.copy_(t)
    return out.expand(spec.shape) if narrow != spec.shape else out


def content_key(flat: torch.Tensor) -> str:
    """Content hash of a flat contiguous tensor: xxh3-128 of its dtype and bytes (shape travels separately).

    Why xxh3 and not sha256: it runs at memory speed (~20 GB/s against ~2 GB/s),
    which is most of a carve's cost on a model with large weights; 128 bits make
    accidental collisions and undetected corruption vanishingly unlikely. It is not
    a defence against someone who can rewrite the store (nothing unkeyed is).
    """
    h = xxhash.xxh3_128(dtype_name(flat.dtype).encode() + b"\0")
    if flat.numel():
        h.update(memoryview(flat.detach().view(torch.uint8).numpy()))
    return h.hexdigest()


class HashMemo:
    """Content keys of tensors, remembered while their memory lives and is unmodified.

    Why: weights and activations are read by many ops; hashing them once per
    distinct (memory, version) instead of once per use is most of a carve's or an
    upload's hashing cost. Validity rests on the storage's Python object, which
    lives exactly as long as the memory, and on the version counter, which every
    in-place write bumps (after the dispatch mode returns, so in-place outputs
    must skip the memo).
    """

    def __init__(self) -> None:
        self._seen: dict[tuple, tuple] = {}

    def key(self, t: torch.Tensor, flat: torch.Tensor, *, memo: bool = True) -> str:
        """The content key of ``flat`` (``t``'s elements, flattened), memoized when it aliases ``t``.

        ``t`` must be the tensor the program holds, not a ``detach()`` of it: a detached
        alias does not see the version bumps of later in-place writes."""
        aliases = flat.numel() > 0 and flat.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        if not (aliases and memo):
            return content_key(flat)
        geometry = (flat.data_ptr(), flat.numel(), flat.dtype)
        try:
            version = t._version
        except RuntimeError:  # inference tensors carry no version counter
            return content_key(flat)
        hit = self._seen.get(geometry)
        if hit is not None and hit[0]() is not None and hit[1] == version:
            return hit[2]
        key = content_key(flat)
        self._seen[geometry] = (weakref.ref(t.untyped_storage()), version, key)
        return key

    def peek(self, t: torch.Tensor, flat: torch.Tensor) -> str | None:
        """The memoized key of ``flat`` if still valid, without hashing."""
        hit = self._seen.get((flat.data_ptr(), flat.numel(), flat.dtype)) if flat.numel() else None
        try:
            return hit[2] if hit is not None and hit[0]() is not None and hit[1] == t._version else None
        except RuntimeError:
            return None

    def remember(self, t: torch.Tensor, key: str) -> None:
        """Record a key computed elsewhere (e.g. by a worker) for contiguous ``t``."""
        try:
            version = t._version
        except RuntimeError:
            return
        flat = t.reshape(-1)
        if flat.numel():
            self._seen[(flat.data_ptr(), flat.numel(), flat.dtype)] = (weakref.ref(t.untyped_storage()), version, key)

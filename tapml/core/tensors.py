"""How a tensor is described to a platform, and how to lay one out exactly as described.

Why exact layout: some CPU kernels take different paths for a transposed or
offset operand, so the identity target reproduces the reference bit for bit
only when every input has the strides and storage offset it had when carved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TensorSpec", "relayout", "dtype_name", "dtype_from_name", "storage_order", "broadcast_narrowed"]

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128, torch.complex64,
              torch.complex32, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16,
              torch.uint32, torch.uint64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
              torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.qint8, torch.quint8, torch.qint32)
}
_DTYPE_NAMES: dict[torch.dtype, str] = {d: n for n, d in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """A dtype by name, from a fixed table: names arrive from stores and the wire, never ``getattr(torch, ...)``."""
    dtype = _DTYPES.get(name) if isinstance(name, str) else None  # (a list or dict is never hashed)
    if dtype is None:
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

    @property
    def contiguous(self) -> bool:
        return contiguous_layout(self.shape, self.stride, self.offset, self.exact)


def contiguous_layout(shape, stride, offset: int = 0, exact: bool = True) -> bool:
    """Elements in logical order from the storage's start, without gaps (size-1 dims take any stride, as in
    ``is_contiguous``); ``exact``: not a self-overlapping layout rebuilt contiguous."""
    if not exact or offset:
        return False
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride), strict=True):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def storage_order(shape, stride) -> list[int]:
    """Dims from outermost to innermost in memory; ties keep dim order."""
    return sorted(range(len(shape)), key=lambda d: (-stride[d], d))


def broadcast_narrowed(shape, stride) -> tuple[int, ...]:
    """Broadcast dims (stride 0) hold one element's worth of memory (an empty dim holds none)."""
    return tuple(1 if st == 0 and sz else sz for sz, st in zip(shape, stride, strict=True))


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

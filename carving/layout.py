"""Tensor layout: the canonical bytes a tensor is stored as, and its exact rebuild.

Why: a transposed weight (``aten.t``) and the weight itself hold the same bytes;
storing every tensor in *storage order* makes them one stored tensor. Replay must
be bit-exact, and some kernels take different paths for different strides, so
each use keeps its shape, strides and storage offset and is rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from tapml.core import (
    HashMemo,
    TensorSpec,
    broadcast_narrowed,
    content_key,
    contiguous_layout,
    dtype_from_name,
    dtype_name,
    relayout,
    storage_order,
)

__all__ = ["TensorRef", "canonical", "content_key", "materialize", "dtype_name", "dtype_from_name", "tensor_key"]


@dataclass(frozen=True)
class TensorRef:
    """One use of a stored tensor: which bytes, and how they were laid out."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    exact: bool  # False when the layout overlapped itself and is rebuilt contiguous
    storage: bool = False  # the stored bytes are the tensor's whole storage (read by as_strided beyond the view)

    def __hash__(self) -> int:
        """Hashed once: a use is a dict key several times per read (kept uses, read history, NaN/Inf counts),
        and hashing its fields took ~0.6 µs each time (~5 µs per judged op)."""
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in fields(self)))  # what the generated hash hashes
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}  # a str's hash is per process

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.dtype, self.shape, self.stride, self.offset, self.exact)

    def to_json(self) -> dict:
        return {"key": self.key, **self.spec.to_json()}

    def held_by(self, t: torch.Tensor, key: str | None) -> bool:
        """Whether ``t``, whose content key is ``key``, is this use exactly: the same bytes in the same
        logical order, shape and dtype (the key hashes the elements in storage order, which is logical
        order only for a contiguous use of its own bytes)."""
        return (key == self.key and not self.storage and tuple(t.shape) == self.shape
                and dtype_name(t.dtype) == self.dtype and t.is_contiguous()
                and contiguous_layout(self.shape, self.stride, self.offset, self.exact))

    @classmethod
    def from_json(cls, obj: dict) -> TensorRef:
        spec = TensorSpec.from_json(obj)
        return cls(obj["key"], spec.dtype, spec.shape, spec.stride, spec.offset, spec.exact, bool(obj.get("storage")))


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
        return _unit_stride(t.reshape(-1)), True
    narrow = broadcast_narrowed(shape, stride)
    if _overlaps(narrow, stride):  # stored in logical order, every element (materialize reshapes it so)
        return t.contiguous().reshape(-1), False
    if narrow != shape:
        t = t.as_strided(narrow, stride, t.storage_offset())
    flat = t.permute(storage_order(narrow, stride)).reshape(-1)
    # a strided 1-D result (gaps between elements) is still a view: the bytes must be packed
    return (_unit_stride(flat) if flat.is_contiguous() else flat.contiguous()), True


def _unit_stride(flat: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D tensor whose stride says so: size-1 dims keep any stride through a reshape (12, 0, ...),
    and byte views of it require 1."""
    if flat.numel() and flat.stride(0) != 1:
        return flat.as_strided((flat.numel(),), (1,), flat.storage_offset())
    return flat


def materialize(flat: torch.Tensor, ref: TensorRef, *, copy: bool = True) -> torch.Tensor:
    """Rebuild the tensor a ref describes, with its exact strides and offset (``copy=False``: a view of
    ``flat`` where its layout already is that, for a caller that only reads)."""
    if ref.storage:  # a view over a copy of the whole storage, as the op saw it
        return (flat.clone() if copy else flat).as_strided(ref.shape, ref.stride, ref.offset)
    if not ref.exact:
        return flat.reshape(ref.shape).clone() if copy else flat.reshape(ref.shape)
    narrow = broadcast_narrowed(ref.shape, ref.stride)
    order = storage_order(narrow, ref.stride)
    logical = flat.reshape([narrow[d] for d in order]).permute(_inverse(order))
    return relayout(logical.expand(ref.shape), ref.spec, copy=copy)


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def tensor_key(t: torch.Tensor, memo: HashMemo | None = None) -> str:
    """The content key the store gives ``t`` (its elements in storage order, or logical order when
    overlapping); with ``memo``, a tensor read again unchanged is not hashed again."""
    plain = t.detach().cpu().resolve_conj().resolve_neg()
    flat, _ = canonical(plain)
    if memo is None or plain.device != t.device:
        return content_key(flat)
    return memo.key(t, flat)

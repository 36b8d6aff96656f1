"""Content keys: what identifies a tensor's bytes in the store, on the wire and in caches."""

from __future__ import annotations

import weakref
from collections.abc import Hashable

import torch
import xxhash
from torch.autograd.graph import increment_version

from .tensors import dtype_name

__all__ = ["content_key", "content_digest", "byte_view", "HashMemo", "mark_content", "content_mark", "overwrite"]

_PREFIXES: dict[torch.dtype, xxhash.xxh3_128] = {}  # the hash state after each dtype's name: copied, not redone


def content_key(flat: torch.Tensor, view: memoryview | None = None) -> str:
    """Content hash of a flat contiguous tensor: xxh3-128 of its dtype and bytes (shape travels separately).

    Why xxh3 and not sha256: it runs at memory speed (~20 GB/s against ~2 GB/s),
    which is most of a carve's cost on a model with large weights; 128 bits make
    accidental collisions and undetected corruption vanishingly unlikely. It is not
    a defence against someone who can rewrite the store (nothing unkeyed is).
    """
    return content_digest(flat, view).hex()


def content_digest(flat: torch.Tensor, view: memoryview | None = None) -> bytes:
    """``content_key`` as its 16 raw bytes (what binary frames carry); ``view``: its ``byte_view``, when the
    caller has it."""
    prefix = _PREFIXES.get(flat.dtype)
    if prefix is None:
        prefix = _PREFIXES[flat.dtype] = xxhash.xxh3_128(dtype_name(flat.dtype).encode() + b"\0")
    h = prefix.copy()
    if flat.numel():
        h.update(byte_view(flat) if view is None else view)
    return h.digest()


def byte_view(t: torch.Tensor) -> memoryview:
    """A tensor's elements in logical order as raw bytes (copied only when they are not already so laid
    out): what is hashed and what crosses the wire. Conjugate and negative views are resolved first."""
    if t.is_contiguous() and not t.requires_grad and not t.is_conj() and not t.is_neg() and t.numel():
        try:  # the common case in one step (a dtype numpy lacks, such as bfloat16, takes the general path)
            return memoryview(t.numpy()).cast("B")
        except (TypeError, ValueError, RuntimeError):
            pass
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # size-1 dims keep any stride through a reshape
        flat = flat.as_strided((flat.numel(),), (1,), flat.storage_offset())
    return memoryview(flat.view(torch.uint8).numpy())


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
        self._sweep_at = 1024

    def _add(self, geometry: tuple, entry: tuple) -> None:
        """Remember one key; when the memo has doubled since its last sweep, forget the memory that is gone
        (at 1.1B parameters a generation leaves tens of thousands of dead entries)."""
        self._seen[geometry] = entry
        if len(self._seen) >= self._sweep_at:
            self._seen = {g: e for g, e in self._seen.items() if e[0]() is not None}
            self._sweep_at = max(1024, 2 * len(self._seen))

    def key(self, t: torch.Tensor, flat: torch.Tensor, *, memo: bool = True, view: memoryview | None = None) -> str:
        """The content key of ``flat`` (``t``'s elements, flattened), memoized when it aliases ``t``
        (``view``: ``flat``'s bytes as a buffer, when the caller has them cheaper than ``byte_view``).

        ``t`` must be the tensor the program holds, not a ``detach()`` of it: a detached
        alias does not see the version bumps of later in-place writes."""
        aliases = flat.numel() > 0 and (flat is t
                                        or flat.untyped_storage().data_ptr() == t.untyped_storage().data_ptr())
        if not (aliases and memo):
            return content_key(flat, view)
        geometry = (flat.data_ptr(), flat.numel(), flat.dtype)
        try:
            version = t._version
        except RuntimeError:  # inference tensors carry no version counter
            return content_key(flat, view)
        hit = self._seen.get(geometry)
        if hit is not None and hit[0]() is not None and hit[1] == version:
            return hit[2]
        key = content_key(flat, view)
        self._add(geometry, (weakref.ref(t.untyped_storage()), version, key))
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
        if t.numel():  # contiguous: its flattening starts at the same address with the same count
            self._add((t.data_ptr(), t.numel(), t.dtype), (weakref.ref(t.untyped_storage()), version, key))


_MARKS: dict[int, tuple[weakref.ref, int, Hashable]] = {}  # id(tensor) -> (the tensor, its version, its mark)


def mark_content(t: torch.Tensor, mark: Hashable) -> torch.Tensor:
    """Say that ``t`` holds exactly the content ``mark`` names (a store's content key and layout), for as
    long as this Python object lives unmodified; returns ``t``.

    Why: what is computed from a carved tensor's values (is it all finite? how many NaNs?) holds for
    every read of the same content, so a comparison can remember it per mark instead of per read. The
    tensor object is not touched (no attribute that pickling or copying would carry); an in-place write
    bumps the version and voids the mark."""
    try:
        version = t._version
    except RuntimeError:  # inference tensors carry no version counter: not marked
        return t
    ident = id(t)
    _MARKS[ident] = (weakref.ref(t, lambda _, ident=ident: _forget(ident)), version, mark)
    return t


def content_mark(t: torch.Tensor) -> Hashable | None:
    """The mark ``mark_content`` gave this very tensor, while it is unmodified; None otherwise."""
    hit = _MARKS.get(id(t))
    if hit is None or hit[0]() is not t:
        return None
    try:
        return hit[2] if t._version == hit[1] else None
    except RuntimeError:
        return None


def _forget(ident: int) -> None:
    hit = _MARKS.get(ident)
    if hit is not None and hit[0]() is None:  # not a newer object's entry under a reused id
        del _MARKS[ident]


def overwrite(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for tapml's own writes into a live tensor inside a dispatch mode (a placeholder
    filled, a stand-in given its true values). Why: such a write runs below autograd, where torch bumps no
    version counter, and every cache here (``HashMemo``, content marks) trusts the counter to see writes."""
    dst.copy_(src)
    try:
        increment_version(dst)
    except RuntimeError:  # inference tensors carry no version counter (and are never cached)
        pass

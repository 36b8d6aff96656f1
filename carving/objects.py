"""What the tracer remembers about each live tensor object: its recorded use, until the tensor changes.

Why: a weight is read by an op in every step and an activation by the next few ops;
describing such a tensor again (layout, content key, signature token, storage) costs
more than the op's own dispatch. An entry stays valid while the object lives and its
version counter is unchanged (every in-place write bumps it, after the dispatch mode
returns); an op that writes a tensor in place may also change its metadata
(``resize_``, ``t_``, ``set_``), so the tracer ``forget``s it before that op runs.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .store import StoreWriter

__all__ = ["Entry", "Objects"]


class Entry:
    """One tensor object as recorded: its use (the ref shared by every use), the name of its signature token
    ``(dtype, shape, stride)`` (see ``Objects.token_of``), its bytes, the op output it is (``maker``) and its
    storage pointer."""

    __slots__ = ("obj", "version", "now", "use", "enc", "token", "nbytes", "maker", "storage")

    def __init__(self, obj: weakref.ref) -> None:
        self.obj = obj
        self.version: int | None = None  # the version ``use`` describes; None: describe again on next use
        self.now = -1  # the version at the latest use (-1: an inference tensor, which has no counter)
        self.use = -1  # the tensor's ref, as an index in the manifest's uses
        self.enc: dict | None = None  # ``{"tensor": use}``, as an op row encodes it (shared: never mutate)
        self.token: tuple | None = None
        self.nbytes = 0
        self.maker: tuple[int, int] | None = None  # (op, output slot) that returned this object
        self.storage: int | None = None  # untyped storage pointer, None when empty


class Objects:
    """The entries, and the distinct tensor uses they describe (the manifest's ``uses``).

    ``seen`` (``id(tensor)`` -> entry) is public: the tracer inlines the hit path of ``entry``."""

    def __init__(self, writer: StoreWriter) -> None:
        self._writer = writer
        self.seen: dict[int, Entry] = {}
        self.uses: list[dict] = []
        self._uses: dict[tuple, int] = {}
        # signature tokens (dtype, shape, stride) by a short interned name: a signature key of names hashes
        # without walking nested tuples; ``token_of`` turns the names back for the digest
        self._tokens: dict[tuple, str] = {}
        self.token_of: dict[str, tuple] = {}

    def add_use(self, ref: dict) -> int:
        """``ref``'s index in ``uses`` (an equal use recorded before keeps its index)."""
        return self._add_use((ref["key"], ref["dtype"], tuple(ref["shape"]), tuple(ref["stride"]),
                              ref.get("offset", 0), ref.get("exact", True), ref.get("storage", False)), ref)

    def _add_use(self, identity: tuple, ref: dict) -> int:
        i = self._uses.get(identity)
        if i is None:
            i = self._uses[identity] = len(self.uses)
            self.uses.append(ref)
        return i

    def entry(self, t: torch.Tensor, *, cached: bool = True) -> Entry:
        """``t``'s entry, described again when it changed since (or when ``cached`` is False: an in-place
        op's output, whose version is bumped only after the op returns). ``UncarvableTensor`` propagates."""
        e = self.seen.get(id(t))
        if e is None or e.obj() is not t:
            e = self.seen[id(t)] = Entry(weakref.ref(t))
        try:
            now = t._version
        except RuntimeError:  # inference tensors carry no version counter: never reused
            now = -1
        e.now = now
        if e.version == now and cached:
            self._writer.bytes_referenced += e.nbytes
            return e
        return self.describe(e, t, now, cached)

    def describe(self, e: Entry, t: torch.Tensor, now: int, cached: bool = True) -> Entry:
        """Describe ``t`` (at version ``now``) into its entry ``e``: what ``entry`` does on a miss."""
        e.version = None
        ref, e.nbytes, identity = self._writer.describe(t, cached=cached)
        token = identity[1:4]  # (dtype, shape, stride): tuples, see StoreWriter.use
        name = self._tokens.get(token)
        if name is None:
            name = self._tokens[token] = f"\0{len(self._tokens)}"  # no op name or bracket starts with NUL
            self.token_of[name] = token
        e.token = name
        i = self._uses.get(identity)
        if i is None:
            i = self._uses[identity] = len(self.uses)
            self.uses.append(ref)
        e.use = i
        e.enc = {"tensor": i}
        e.storage = t.untyped_storage().data_ptr() if t.numel() else None
        if cached and now >= 0:
            e.version = now
        return e

    def made(self, t: torch.Tensor, op: int, slot: int) -> Entry:
        """Mark ``t`` as output ``slot`` of ``op`` (views included)."""
        e = self.seen.get(id(t))
        if e is None or e.obj() is not t:
            e = self.seen[id(t)] = Entry(weakref.ref(t))
        e.maker = (op, slot)
        return e

    def maker(self, t: torch.Tensor) -> tuple[int, int] | None:
        e = self.seen.get(id(t))
        return e.maker if e is not None and e.obj() is t else None

    def forget(self, tensors: list) -> None:
        """Describe these tensors afresh at their next use (their metadata may change); keep their maker."""
        for t in tensors:
            e = self.seen.get(id(t))
            if e is not None:
                e.version = None

    def observe(self, t: torch.Tensor) -> Entry:
        """``t``'s entry for data flow only (maker, storage, version), without recording a use."""
        e = self.seen.get(id(t))
        if e is None or e.obj() is not t:
            e = self.seen[id(t)] = Entry(weakref.ref(t))
        try:
            e.now = t._version
        except RuntimeError:
            e.now = -1
        e.storage = t.untyped_storage().data_ptr() if t.numel() and t.layout == torch.strided else None
        return e

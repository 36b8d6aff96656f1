"""The fixture store: ``manifest.json`` plus content-addressed safetensors shards.

Why this shape: weights are read by many ops and activations by several, so
tensors are stored once by content hash; a large carve must not hold every
tensor in memory, so shards stream to disk as they fill; a killed carve must not
leave a store that looks whole, so the directory is built under a temporary
name and renamed into place only when the manifest is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from ctypes import c_char, string_at
from pathlib import Path

import orjson
import safetensors
import safetensors.torch
import torch
from xxhash import xxh3_128_hexdigest

from tapml.core import HashMemo, OpCall, iter_specs, make_room, mark_content

from .atomic import AtomicDir, OutputError
from .graph import Graph
from .layout import TensorRef, _unit_stride, canonical, content_key, dtype_from_name, dtype_name, materialize
from .manifest import SCHEMA_VERSION, compact, read_manifest
from .shards import ShardReader, writable, write_shard

__all__ = ["SCHEMA_VERSION", "StoreError", "StoreWriter", "FixtureStore", "MANIFEST", "UncarvableTensor"]

MANIFEST = "manifest.json"
_SHARD_DIR = "tensors"
_PACKED = "__packed__"  # one uint8 tensor per shard holding the small tensors back to back
# shards kept open for reading (a file descriptor and the parsed header each)
OPEN_SHARDS = 4
# read-only uses kept for the next read of them (a per-op offload's carved outputs, ~20 MB per MiniLM
# forward); bounded because they are owned memory: at 1B parameters every use kept would be the store, 3 GB.
# A use is kept only when read again within this many bytes of reads: one read back after more would have
# been pushed out before it (at 1.1B a forward reads GBs: the budget then held 32 MiB that nothing read again)
VIEW_BYTES = 32 << 20
# and only a use of at most KEPT_USE_BYTES: keeping one saves a read's fixed cost, which matters for small
# uses (MiniLM's are ≤ 432 KB); a large one's read is mostly its copy, and kept it is resident memory (a 1.1B
# generation kept 26 MB of 2 MB attention-sized outputs, a quarter of the client's rise over its start)
KEPT_USE_BYTES = 1 << 20
USE_COST = 1 << 10  # what a kept use holds besides its bytes (tensor, storage, marks): ~1 KB, counted
PARSED_OPS = 4096  # ops whose OpCall and output refs are kept parsed: a whole MiniLM forward, a third of 1.1B's
_PACK_BELOW = 64 << 10  # per-tensor header and bookkeeping would dominate below this size


class StoreError(OutputError):
    """A store that cannot be written or read; the message names the file."""


class UncarvableTensor(ValueError):
    """A tensor the store cannot hold (sparse, quantized, meta, nested); the message says which kind."""


_SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_DIGEST_FIELD = ',"digest":"'
_DTYPE_INFO: dict[torch.dtype, tuple[str, bytes, int, bool]] = {}


def _held(use: torch.Tensor) -> int:
    """What keeping a read-only use costs against ``VIEW_BYTES``: its bytes and ``USE_COST`` (a budget of
    bytes alone would let 32 MiB of 64-byte uses hold half a million tensors)."""
    return use.untyped_storage().nbytes() + USE_COST


def _dtype_info(dtype: torch.dtype) -> tuple[str, bytes, int, bool]:
    """A dtype's name, what ``content_key`` hashes before the bytes, its item size, and whether its tensors
    need a closer look before their bytes are read (quantized: refused; complex: may be a conjugate view)."""
    info = _DTYPE_INFO.get(dtype)
    if info is None:
        name = dtype_name(dtype)
        try:
            odd = dtype.is_complex or not isinstance(dtype.is_signed, bool)
        except RuntimeError:  # "not supported for quantized types"
            odd = True
        info = _DTYPE_INFO[dtype] = (name, name.encode() + b"\0", dtype.itemsize, odd)
    return info


_PERMUTED: dict[tuple, bool] = {}  # (shape, stride) -> _permuted: a run repeats its layouts


def _permuted(shape: tuple, stride: tuple) -> bool:
    """Whether the layout is a permutation of a contiguous one (a transpose, a permuted view): no gaps, no
    overlap, no broadcast — so its elements in storage order are the bytes from its first element on."""
    hit = _PERMUTED.get((shape, stride))
    if hit is None:
        if len(_PERMUTED) > 1 << 16:
            _PERMUTED.clear()
        hit = _PERMUTED[(shape, stride)] = _permutation(shape, stride)
    return hit


def _permutation(shape: tuple, stride: tuple) -> bool:
    expected = 1
    for st, sz in sorted(zip(stride, shape, strict=True)):
        if sz == 1:
            continue
        if st != expected:
            return False
        expected *= sz
    return True


# fields that hold no floats (ints, strings, tensor uses): orjson writes them as json.dumps would, ~10x faster
_BULK = frozenset({"strings", "uses", "layers", "steps", "edges", "flow", "outputs", "returns", "tensors", "shards"})


def _dumps(body: dict, *, floats_exact: bool = True) -> str:
    """``body`` as compact JSON text. orjson encodes the bulk (a generate loop's ops and uses: ~7 ms with the
    stdlib's C encoder, ~0.7 ms with orjson); ``json`` keeps what orjson would write differently: the small
    fields a user may fill (``model``), and ``ops`` when ``floats_exact`` is False (a non-finite float inside a
    complex scalar: orjson writes null), or any field whose text would not be ASCII (``json`` escapes)."""
    parts = []
    for name, value in body.items():
        text = None
        if name in _BULK or (name == "ops" and floats_exact):
            try:
                raw = orjson.dumps(value)
                text = raw.decode("ascii") if raw.isascii() else None
            except (orjson.JSONEncodeError, TypeError):  # ints beyond 64 bits, non-string keys: the stdlib's turn
                text = None
        if text is None:
            text = json.dumps(value, separators=(",", ":"))
        parts.append(f"{json.dumps(name)}:{text}")
    return "{" + ",".join(parts) + "}"


def _seal(body: dict, *, floats_exact: bool = True) -> str:
    """Serialize once and append the sha256 of those exact bytes as the last field."""
    text = _dumps(body, floats_exact=floats_exact)
    return f'{text[:-1]}{_DIGEST_FIELD}{hashlib.sha256(text.encode()).hexdigest()}"}}'


def _unseal(text: str) -> bool:
    """True when the manifest text still matches the digest it ends with."""
    cut = text.rfind(_DIGEST_FIELD)
    if cut < 0:
        return False
    body, digest = text[:cut] + "}", text[cut + len(_DIGEST_FIELD):].rstrip().removesuffix('"}')
    return hashlib.sha256(body.encode()).hexdigest() == digest


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as dense CPU memory with no lazy conjugate or negation, or ``UncarvableTensor``."""
    if t.layout != torch.strided or t.is_quantized or t.is_meta or t.is_nested:
        kind = "quantized" if t.is_quantized else ("meta" if t.is_meta else str(t.layout).removeprefix("torch."))
        raise UncarvableTensor(f"a {kind} tensor {tuple(t.shape)} (tapml records dense strided tensors only)")
    if not t.is_cpu:
        t = t.cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t


class StoreWriter:
    """Streams tensors into shards of a temporary directory; ``commit`` publishes it."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False, shard_bytes: int = 64 << 20):
        try:
            self._dir = AtomicDir(path, force=force)
        except OutputError as e:
            raise StoreError(str(e)) from None
        self.path, self._tmp = self._dir.path, self._dir.tmp
        (self._tmp / _SHARD_DIR).mkdir()
        self.shard_bytes = shard_bytes
        self.index: dict[str, dict] = {}  # key -> {"shard", "dtype", "numel", "nbytes"}
        self.shards: dict[str, dict] = {}
        self.bytes_stored = 0  # unique tensor bytes accepted so far
        self.bytes_referenced = 0  # bytes over every use, before dedup
        self._pending: dict[str, torch.Tensor] = {}  # tensors of 64 KiB and more, held until their shard is written
        self._pending_small: list[str] = []  # keys whose bytes are in _packed
        self._packed: list[bytes] = []
        self._packed_bytes = 0
        self._pending_bytes = 0
        self._pending_views: dict[int, list[str]] = {}  # storage ptr -> pending keys that alias it
        self._memo = HashMemo()  # a tensor read by many ops is hashed once

    # -- writing -------------------------------------------------------------
    def add(self, t: torch.Tensor, *, cached: bool = True) -> dict:
        """Record one use of a tensor; its bytes are stored only the first time.

        Returns the use as a ``TensorRef`` JSON dict (built directly: this is the hot path).

        ``cached=False`` for outputs of in-place ops: their version counter is bumped
        only after the dispatch mode returns, so the hash cache cannot see the write yet.
        """
        return self.use(t, cached=cached)[0]

    def use(self, t: torch.Tensor, *, cached: bool = True) -> tuple[dict, int]:
        """``add``, also returning the bytes this use references (what ``reused`` counts again)."""
        ref, nbytes, _ = self.describe(t, cached=cached)
        return ref, nbytes

    def describe(self, t: torch.Tensor, *, cached: bool = True) -> tuple[dict, int, tuple]:
        """``use``, also returning the use's identity ``(key, dtype, shape, stride, offset, exact, storage)``:
        what the tracer de-duplicates uses by, built here where every part is at hand."""
        held = t  # the caller's tensor: its version counter sees later in-place writes; a detach() would not
        dtype = t.dtype
        name, prefix, itemsize, odd = _DTYPE_INFO.get(dtype) or _dtype_info(dtype)
        if odd or t.layout != torch.strided or not t.is_cpu or t.is_nested or t.is_neg():  # all false, mostly
            t = _plain(t)
        shape, stride = tuple(t.shape), t.stride()
        numel = t.numel()
        nbytes = numel * itemsize
        offset = t.storage_offset()
        if nbytes < _PACK_BELOW and (t.is_contiguous() or _permuted(shape, stride)):
            # the elements in storage order are the bytes at data_ptr: hashed and copied without a torch op
            self.bytes_referenced += nbytes
            raw = string_at(t.data_ptr(), nbytes) if nbytes else b""
            key = xxh3_128_hexdigest(prefix + raw)
            if key not in self.index:
                self._pack(key, name, numel, raw)
            ref = {"key": key, "dtype": name, "shape": shape, "stride": stride}
            if offset:
                ref["offset"] = offset
            return ref, nbytes, (key, name, shape, stride, offset, True, False)
        exact = True
        if t.is_contiguous():
            flat = t
        else:
            flat, exact = canonical(t.detach())
        nbytes = flat.numel() * flat.element_size()
        self.bytes_referenced += nbytes
        if nbytes < _PACK_BELOW:  # a narrowed broadcast or a view with gaps, packed by canonical()
            raw = string_at(flat.data_ptr(), nbytes) if nbytes else b""
            key = xxh3_128_hexdigest(prefix + raw)
            if key not in self.index:
                self._pack(key, name, flat.numel(), raw)
        else:
            if flat is t:
                flat = _unit_stride(t.detach().reshape(-1))
            # flat is contiguous CPU memory: its bytes read through ctypes, not a uint8 view and numpy (~20 us)
            raw = (c_char * nbytes).from_address(flat.data_ptr())
            key = self._memo.key(held if held.device == t.device else t, flat, memo=cached, view=raw)
            if key not in self.index:
                self.index[key] = {"dtype": dtype_name(flat.dtype), "numel": flat.numel(), "nbytes": nbytes}
                self._pending[key] = flat
                storage = flat.untyped_storage().data_ptr()
                if storage == t.untyped_storage().data_ptr():  # the program's memory: copied if written in place
                    self._pending_views.setdefault(storage, []).append(key)
                self._stored(nbytes)
        # shape and stride as tuples (JSON arrays all the same): the tracer's signature tokens reuse them
        ref = {"key": key, "dtype": name, "shape": shape, "stride": stride}
        if offset:
            ref["offset"] = offset
        if not exact:
            ref["exact"] = False
        return ref, nbytes, (key, name, shape, stride, offset, exact, False)

    def _pack(self, key: str, name: str, numel: int, raw: bytes) -> None:
        """A new small tensor's bytes into the shard's packed blob."""
        self.index[key] = {"dtype": name, "numel": numel, "nbytes": len(raw), "offset": self._packed_bytes}
        self._packed.append(raw)  # joined once per shard: a growing bytearray would copy itself
        self._packed_bytes += len(raw)
        self._pending_small.append(key)
        self._stored(len(raw))

    def reused(self, nbytes: int) -> None:
        """Count one more use of bytes already recorded (a caller that remembers the ref)."""
        self.bytes_referenced += nbytes

    def _stored(self, nbytes: int) -> None:
        self._pending_bytes += nbytes
        self.bytes_stored += nbytes
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def add_storage(self, t: torch.Tensor) -> dict:
        """Record a tensor with its whole storage: for ops (``as_strided``) that read beyond the view."""
        if t.layout != torch.strided or t.is_quantized or t.is_meta or t.is_nested:
            return self.add(t)
        n = t.untyped_storage().nbytes() // t.element_size()
        whole = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (n,), (1,))  # CUDA: copied
        ref = dict(self.add(whole), shape=tuple(t.shape), stride=t.stride(), storage=True)
        if t.storage_offset():
            ref["offset"] = t.storage_offset()
        return ref

    def protect(self, tensors: list[torch.Tensor]) -> None:
        """Copy pending bytes that an in-place op is about to overwrite (small ones were copied already)."""
        for t in tensors:
            if t.numel() == 0 or t.device.type != "cpu":
                continue
            for key in self._pending_views.pop(t.untyped_storage().data_ptr(), ()):
                if key in self._pending:
                    self._pending[key] = self._pending[key].clone()

    def flush(self) -> None:
        """Write the pending tensors as one shard; small ones packed into one blob."""
        if not self._pending and not self._pending_small:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        for key in self._pending:
            self.index[key]["shard"] = name
        for key in self._pending_small:
            self.index[key]["shard"] = name
        target = self._tmp / _SHARD_DIR / name
        try:
            if writable(self._pending):
                size = write_shard(target, self._pending, _PACKED, self._packed if self._pending_small else None)
            else:
                size = self._save_file(target)
        except OSError as e:
            raise StoreError(f"cannot write {target}: {e.strerror or e}") from None
        self.shards[name] = {"bytes": size}
        self._pending.clear()
        self._pending_views.clear()
        self._pending_small.clear()
        self._packed.clear()
        self._packed_bytes = 0
        self._pending_bytes = 0

    def _save_file(self, target: Path) -> int:
        """The shard through ``safetensors.torch.save_file`` (a dtype ``write_shard`` has no name for)."""
        tensors, owners = {}, set()
        for key, flat in self._pending.items():
            ptr = flat.untyped_storage().data_ptr()
            if ptr in owners:  # safetensors refuses tensors that share memory
                flat = flat.clone()
            owners.add(flat.untyped_storage().data_ptr())
            tensors[key] = flat
        if self._pending_small:
            packed = bytearray(b"".join(self._packed))  # writable: frombuffer warns on read-only memory
            tensors[_PACKED] = torch.frombuffer(packed, dtype=torch.uint8) if packed else \
                torch.empty(0, dtype=torch.uint8)
        safetensors.torch.save_file(tensors, str(target))
        return target.stat().st_size

    def commit(self, manifest: dict, *, compacted: bool = False, floats_exact: bool = True) -> Path:
        """Write the manifest and move the finished store into place atomically. The manifest comes in
        memory's shape (ops and layers as records, tensor refs inline), or ``compacted`` (schema 2's form).
        ``floats_exact``: no op value holds a non-finite float inside a complex (see ``_dumps``)."""
        self.flush()
        body = dict(manifest if compacted else compact(manifest), schema=SCHEMA_VERSION, tensors=self.index,
                    shards=self.shards)
        target = self._tmp / MANIFEST
        try:
            target.write_text(_seal(body, floats_exact=floats_exact and compacted))
            return self._dir.commit()
        except OSError as e:
            raise StoreError(f"cannot write {target}: {e.strerror or e}") from None

    def abort(self) -> None:
        self._dir.abort()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # no-op after commit


class FixtureStore:
    """A carved store opened for reading; every problem is a ``StoreError`` naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a fixture store (a directory holding {MANIFEST})")
        if not self.path.is_dir():
            raise StoreError(f"{self.path} is not a fixture store (no such directory)")
        if not mpath.is_file():
            raise StoreError(f"{self.path} is not a fixture store ({MANIFEST} missing)")
        self._root = self.path.resolve()
        self._inside(mpath)
        try:
            text = mpath.read_text()
            self.manifest = json.loads(text)
        except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise StoreError(f"{mpath} is corrupt: {e}") from None
        schema = self.manifest.get("schema") if isinstance(self.manifest, dict) else None
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise StoreError(f"{mpath} is not a tapml manifest (no integer schema)")
        if schema > SCHEMA_VERSION:
            raise StoreError(f"{mpath} has schema {schema}, newer than this tapml reads ({SCHEMA_VERSION}); "
                             "upgrade tapml")
        if not _unseal(text):
            raise StoreError(f"{mpath} was modified after the carve (digest mismatch)")
        try:
            self.manifest = read_manifest(self.manifest)  # a resealed manifest is still only data: check all of it
        except ValueError as e:
            raise StoreError(f"{mpath} is malformed: {e}") from None
        for name, meta in self.manifest["shards"].items():
            shard = self._shard_path(name)
            if not shard.is_file():
                raise StoreError(f"{shard} is missing")
            if shard.stat().st_size != meta["bytes"]:
                raise StoreError(
                    f"{shard} is truncated or altered (size {shard.stat().st_size}, expected {meta['bytes']})"
                )
        self._readers: dict[str, ShardReader] = {}
        # read-only uses (at most VIEW_BYTES of them, the most recently read) and each op's parsed output
        # refs: a per-op offload reads every offloaded op's outputs on every forward
        self._views: dict[TensorRef, torch.Tensor] = {}
        self._view_bytes = 0
        self._read_bytes = 0  # read-only bytes read so far, and where each use's last read ended
        self._last_read: dict[TensorRef, int] = {}
        self._output_refs: dict[int, list[TensorRef]] = {}
        self._calls: dict[int, OpCall] = {}
        self._verified: set[str] = set()
        self._graph: Graph | None = None
        self._resident: dict[str, torch.Tensor] = {}
        self._per_shard: Counter | None = None

    # -- contents ----------------------------------------------------------------
    @property
    def ops(self) -> list[dict]:
        return self.manifest["ops"]

    @property
    def layers(self) -> list[dict]:
        return self.manifest["layers"]

    @property
    def steps(self) -> list[dict]:
        return self.manifest["steps"]

    @property
    def reference(self) -> dict[str, str]:
        """Where the carve ran (stores written before this was recorded ran on the CPU)."""
        return self.manifest.get("reference") or {"name": "torch-cpu (eager)", "device": "cpu"}

    @property
    def tensors(self) -> dict[str, dict]:
        return self.manifest["tensors"]

    def _inside(self, path: Path) -> Path:
        """``path``, if it resolves inside the store: a link to elsewhere is refused, not followed."""
        if not path.resolve().is_relative_to(self._root):
            raise StoreError(f"{path} leads outside the store (a link to {path.resolve()}): refused")
        return path

    def _shard_path(self, name: str) -> Path:
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
            raise StoreError(f"{self.path / MANIFEST} names an invalid shard {str(name)[:80]!r}")
        return self._inside(self.path / _SHARD_DIR / name)

    def flat(self, key: str) -> torch.Tensor:
        """The stored bytes of one tensor, as a flat tensor of its dtype, in fresh memory of its own."""
        meta = self.tensors.get(key)
        if meta is None:
            raise StoreError(f"{self.path / MANIFEST} references unknown tensor {key}")
        shard = meta["shard"]
        try:
            reader = self._readers.pop(shard, None)
            if reader is None:  # a real header holds ~100 bytes per entry: a larger one is not parsed at all
                reader = ShardReader(self._shard_path(shard), header_max=(64 << 10) + 512 * self._entries(shard))
            self._readers[shard] = reader  # the most recently read last; the oldest is closed past OPEN_SHARDS
            if len(self._readers) > OPEN_SHARDS:
                oldest = next(iter(self._readers))
                self._readers.pop(oldest).close()
            if "offset" in meta:
                raw = reader.read(_PACKED, meta["offset"], meta["nbytes"])
            else:
                raw = reader.read(key, whole=meta["nbytes"])
            dtype = dtype_from_name(meta["dtype"])
            flat = raw.view(dtype) if raw.numel() and raw.numel() % dtype.itemsize == 0 else torch.empty(0, dtype=dtype)
        except StoreError:
            raise
        except Exception as e:  # a malformed header, an entry outside the file
            raise StoreError(f"{self._shard_path(shard)} is corrupt: {e}") from None
        if flat.dtype != dtype_from_name(meta["dtype"]) or flat.numel() != meta["numel"]:
            raise StoreError(f"{self._shard_path(shard)} holds {key} with the wrong dtype or size")
        if key not in self._verified:  # every tensor is checked against its content key once, when first read
            if content_key(flat) != key:
                raise StoreError(f"{self._shard_path(shard)}: tensor {key} does not match its content key "
                                 "(the bytes were altered)")
            self._verified.add(key)
        return flat

    def load(self, ref: dict | TensorRef, *, read_only: bool = False) -> torch.Tensor:
        """Rebuild one recorded tensor use with its exact layout, in memory of its own (``read_only``: the
        same memory for every read of it while it is among the recently read, if small — for comparisons, never
        to be written)."""
        if isinstance(ref, dict):
            ref = TensorRef.from_json(ref)
        if not read_only:  # flat() is fresh memory: laid out in place where the layout allows, not copied again
            return materialize(self.flat(ref.key), ref, copy=False)
        hit = self._views.pop(ref, None)
        kept = hit is not None
        # bytes read since its last read; popped and put back: oldest read first, and what was read over
        # VIEW_BYTES ago is forgotten
        since = self._read_bytes - self._last_read.pop(ref, -VIEW_BYTES - 1)
        if not kept:  # marked: a comparison caches what it learns of it per content (carved.py)
            hit = mark_content(materialize(self.flat(ref.key), ref, copy=False), ref)
        size = _held(hit)
        self._read_bytes += size
        self._last_read[ref] = self._read_bytes
        oldest, end = next(iter(self._last_read.items()))
        while self._read_bytes - end > VIEW_BYTES:  # (the use just read ends the loop)
            del self._last_read[oldest]
            oldest, end = next(iter(self._last_read.items()))
        if not kept:
            if size > KEPT_USE_BYTES + USE_COST or since > VIEW_BYTES:  # large, a first read, or gone before its next
                return hit
            self._view_bytes += size
        self._views[ref] = hit  # the most recently read last
        while self._view_bytes > VIEW_BYTES:
            self._view_bytes -= _held(self._views.pop(next(iter(self._views))))
        return hit

    def forget_uses(self) -> None:
        """Drop the read-only uses kept for the next read, and when each was last read: what is read next
        is read as for the first time (the isolated pass after the live runs; a benchmark's first forward)."""
        self._views.clear()
        self._view_bytes = 0
        self._last_read.clear()

    def op_call(self, index: int) -> OpCall:
        """Carved op ``index`` as a platform sees it."""
        op = self._calls.get(index)
        if op is None:
            rec = self.ops[index]
            make_room(self._calls, PARSED_OPS)
            op = self._calls[index] = OpCall(op=rec["op"], args=rec["args"], kwargs=rec["kwargs"],
                                             outputs=rec["outputs"], module=rec["module"], index=rec["index"],
                                             call=rec["call"], library=rec.get("library") or "")
        return op

    @property
    def graph(self) -> Graph:
        """The carved run's data flow (edges between ops, live and dead outputs)."""
        if self._graph is None:
            m = self.manifest
            self._graph = Graph(len(self.ops), m.get("edges"), m.get("outputs"), m.get("flow"), m.get("returns"))
        return self._graph

    def rng_state(self) -> torch.Tensor | None:
        """The CPU generator's state when the carve began (None for stores carved before it was kept)."""
        ref = self.manifest.get("rng_state")
        return self.load(ref) if ref else None

    def share(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors this process already holds, by the content key they had when given (a live model's
        weights): ``inputs(shared=True)`` lays out a view of one instead of reading a copy, if it still
        holds that content. Why: at 1B parameters the isolated pass read ``lm_head``'s and the embedding's
        weights (125 MiB each) beside the model's own, the largest part of the client's peak."""
        self._resident.update(tensors)

    def unshare(self) -> None:
        """Forget the tensors given to ``share`` (the run that lent them is over)."""
        self._resident.clear()

    def _entries(self, shard: str) -> int:
        """How many tensors the manifest places in ``shard`` (its header has one entry each, at most)."""
        if self._per_shard is None:
            self._per_shard = Counter(m["shard"] for m in self.tensors.values())
        return self._per_shard[shard]

    def _shared(self, ref: TensorRef) -> torch.Tensor | None:
        t = self._resident.get(ref.key)
        meta = self.tensors.get(ref.key)
        if t is None or meta is None or t.device.type != "cpu" or not t.is_contiguous():
            return None
        # its own whole storage: a use over the whole storage (``ref.storage``) lays out from offset 0
        if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            return None
        if dtype_name(t.dtype) != meta["dtype"] or t.numel() != meta["numel"] or t.is_conj() or t.is_neg():
            return None
        flat = t.detach().reshape(-1)
        return flat if content_key(flat) == ref.key else None  # hashed at every use: the model may have changed it

    def inputs(self, index: int, *, shared: bool = False) -> list[torch.Tensor]:
        """The recorded input tensors of op ``index``, in ``OpCall.inputs`` order, exact layout (``shared``:
        views of tensors given to ``share`` where they hold the recorded content — for a caller that writes
        none of them and keeps none past the op)."""
        rec = self.ops[index]
        loaded = []
        for ref in iter_specs([rec["args"], rec["kwargs"]]):
            ref = TensorRef.from_json(ref) if isinstance(ref, dict) else ref
            flat = self._shared(ref) if shared and self._resident else None
            loaded.append(materialize(flat, ref, copy=False) if flat is not None else self.load(ref))
        return loaded

    def outputs(self, index: int, *, read_only: bool = False) -> list[torch.Tensor]:
        """The recorded outputs of op ``index`` (``read_only``: see ``load``; what a comparison reads)."""
        return [self.load(ref, read_only=read_only) for ref in self.output_refs(index)]

    def output_refs(self, index: int) -> list[TensorRef]:
        """The recorded outputs of op ``index`` as uses, unread (parsed once)."""
        refs = self._output_refs.get(index)
        if refs is None:
            make_room(self._output_refs, PARSED_OPS)
            refs = self._output_refs[index] = [TensorRef.from_json(r) for r in iter_specs(self.ops[index]["outputs"])]
        return refs

    def op_bytes(self, index: int) -> int:
        """The stored bytes op ``index`` reads and writes (each distinct tensor once): what replaying it moves."""
        rec, tensors = self.ops[index], self.tensors
        keys = {ref["key"] for ref in iter_specs([rec["args"], rec["kwargs"], rec["outputs"]])}
        return sum(tensors[k]["nbytes"] for k in keys if k in tensors)

    def iter_problems(self) -> Iterator[str]:
        """Re-hash every stored tensor; yield one line per mismatch."""
        for key in self.tensors:
            try:
                self.flat(key)  # reading checks the content key
            except StoreError as e:
                yield str(e)

    def verify(self) -> None:
        """Raise ``StoreError`` on the first integrity problem."""
        for problem in self.iter_problems():
            raise StoreError(problem)

    @property
    def stored_bytes(self) -> int:
        return sum(m["bytes"] for m in self.manifest["shards"].values())

    @property
    def unique_tensor_bytes(self) -> int:
        return sum(m["nbytes"] for m in self.tensors.values())

"""One shard file in the safetensors format, written straight from the tensors' memory.

Why not ``safetensors.torch.save_file``: a shard is the carve's pending tensors plus the small
ones packed into one blob; through ``save_file`` the blob is joined into one buffer, copied
into a writable one and wrapped as a tensor, and every tensor goes through numpy first. Here
the header is built once and every piece — each tensor's memory, each small tensor's bytes —
goes to ``os.writev`` as it lies: the kernel's copy into the page cache is the only copy.
The file is a plain safetensors file: ``safetensors.safe_open`` reads it (and checks it).

Why not ``safe_open`` to read: it maps the file, and every page read through the map stays in the
reader's RSS while the shard is open (the offload client's largest cost at 1B parameters: the weight
an op reads, mapped, beside the copy the op gets); and every read of a tensor returns the same mapped
memory, so a caller that writes into it changes what the next read returns. ``ShardReader`` reads each
tensor with ``preadv`` into fresh memory: the page cache holds the file, the reader holds one copy.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import weakref
from pathlib import Path

import torch

__all__ = ["ShardReader", "write_shard", "writable"]

try:  # safetensors' own names for the dtypes it stores
    from safetensors.torch import _TYPES as _BY_NAME

    _NAMES = {dtype: name for name, dtype in _BY_NAME.items()}
except ImportError:  # a safetensors without the table: every shard goes through save_file
    _NAMES = {}

_IOV_MAX = 1024  # buffers per writev call (POSIX minimum, Linux's value)
_HEADER_MAX = 100 << 20  # safetensors' own limit on the header's size


def writable(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether ``write_shard`` can hold these tensors (CPU, contiguous, a dtype with a safetensors name)."""
    return all(t.dtype in _NAMES and t.is_cpu and t.is_contiguous() for t in tensors.values())


def write_shard(path: Path, tensors: dict[str, torch.Tensor], packed_name: str, packed: list[bytes] | None) -> int:
    """Write ``tensors`` (each contiguous; ``writable``) and ``packed`` (the small tensors' bytes, stored back to
    back as one uint8 tensor named ``packed_name``; None: no such tensor) as a safetensors file. Tensors may
    share memory. Returns the file's size."""
    # larger items first keeps every tensor aligned to its item size (all sizes are powers of two)
    order = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
    header: dict[str, dict] = {}
    buffers: list = []
    offset = 0
    for name, t in order:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        if n:
            buffers.append((ctypes.c_char * n).from_address(t.data_ptr()))  # a view of the memory: no copy
        offset += n
    if packed is not None:
        n = sum(len(b) for b in packed)
        header[packed_name] = {"dtype": "U8", "shape": [n], "data_offsets": [offset, offset + n]}
        buffers += packed
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    buffers[:0] = [len(text).to_bytes(8, "little"), text]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _writev_all(fd, buffers)
    finally:
        os.close(fd)
    return 8 + len(text) + offset


def _writev_all(fd: int, buffers: list) -> None:
    """``os.writev`` until every byte is written (a call may write less than asked)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        batch = views[:_IOV_MAX]
        written = os.writev(fd, batch)
        done = 0
        while done < len(batch) and written >= len(batch[done]):
            written -= len(batch[done])
            done += 1
        views = views[done:]
        if written:
            views[0] = views[0][written:]


class ShardReader:
    """Tensors of one safetensors shard, each read into fresh memory (module docstring: why not a map).

    The header is data: its size and every offset read are checked against the file's size before any
    read; a problem is a ``ValueError`` naming it."""

    def __init__(self, path: Path, header_max: int = _HEADER_MAX) -> None:
        # non-blocking: a FIFO swapped in for the shard must not hang the open; then refused as not a file
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            size = info.st_size
            n = int.from_bytes(_pread(fd, 8, 0), "little") if size >= 8 else -1
            if not 0 <= n <= min(size - 8, header_max, _HEADER_MAX):
                raise ValueError(f"header size {n} does not fit a file of {size} bytes (at most {header_max})")
            try:
                header = json.loads(_pread(fd, n, 8))
            except (RecursionError, MemoryError) as e:  # nested too deeply, or too large to hold
                raise ValueError(f"header cannot be parsed ({type(e).__name__})") from None
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._entries, self._start, self._size = fd, header, 8 + n, size
        self._close = weakref.finalize(self, os.close, fd)

    def read(self, name: str, start: int = 0, nbytes: int | None = None, *, whole: int | None = None
             ) -> torch.Tensor:
        """Bytes ``start:start + nbytes`` of tensor ``name`` (all of it by default) as a new uint8 tensor;
        ``whole``: the entry must be exactly this long (what the manifest says), checked before allocating."""
        entry = self._entries.get(name) if name != "__metadata__" else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"no valid entry for {name[:80]!r}")
        length = offsets[1] - offsets[0]
        if whole is not None and length != whole:
            raise ValueError(f"{name[:80]!r} is {length} bytes long, not {whole}")
        nbytes = length - start if nbytes is None else nbytes
        if not (0 <= start and 0 <= nbytes and start + nbytes <= length
                and self._start + offsets[1] <= self._size):
            raise ValueError(f"{name[:80]!r} lies outside the file")
        out = torch.empty(nbytes, dtype=torch.uint8)
        view, at = memoryview(out.numpy()), self._start + offsets[0] + start
        while view.nbytes:  # a read may return less than asked (Linux caps one call near 2 GiB)
            got = os.preadv(self._fd, [view], at)
            if got <= 0:
                raise ValueError(f"{name[:80]!r}: the file ended early")
            view, at = view[got:], at + got
        return out

    def close(self) -> None:
        self._close()


def _pread(fd: int, n: int, at: int) -> bytes:
    data = os.pread(fd, n, at)
    if len(data) != n:
        raise ValueError("the file ended early")
    return data

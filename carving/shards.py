"""One shard file in the safetensors format, written straight from the tensors' memory.

Why not ``safetensors.torch.save_file``: a shard is the carve's pending tensors plus the small
ones packed into one blob; through ``save_file`` the blob is joined into one buffer, copied
into a writable one and wrapped as a tensor, and every tensor goes through numpy first. Here
the header is built once and every piece — each tensor's memory, each small tensor's bytes —
goes to ``os.writev`` as it lies: the kernel's copy into the page cache is the only copy.
The file is a plain safetensors file: ``safetensors.safe_open`` reads it (and checks it).
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import torch

__all__ = ["write_shard", "writable"]

try:  # safetensors' own names for the dtypes it stores
    from safetensors.torch import _TYPES as _BY_NAME

    _NAMES = {dtype: name for name, dtype in _BY_NAME.items()}
except ImportError:  # a safetensors without the table: every shard goes through save_file
    _NAMES = {}

_IOV_MAX = 1024  # buffers per writev call (POSIX minimum, Linux's value)


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

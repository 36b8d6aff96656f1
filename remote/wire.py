"""The data channel: tensors as length-prefixed frames of raw bytes on a plain socket.

Why not rpyc arguments: rpyc's argument path moves bulk bytes at a few MB/s
(rpyc#398), so rpyc carries only small JSON control calls and each client has a
second socket for tensor bytes: a frame is ``u32 header length | JSON header |
payload``, the header naming the tensor's content key, dtype, shape and size.
Payloads are written and read in chunks straight from/into tensor memory.
"""

from __future__ import annotations

import json
import socket
import struct
import threading

import torch
from tapml.platforms.tensors import dtype_from_name, dtype_name

__all__ = ["CHUNK", "send_tensor", "recv_frame", "Inbox", "WireError", "read_preamble", "PayloadRefused"]

CHUNK = 4 << 20
_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 16


class WireError(ConnectionError):
    """The data channel broke or carried something malformed."""


class PayloadRefused(ValueError):
    """A tensor larger than the receiver's cap."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError("data channel closed")
        got += k
    return bytes(buf)


def read_preamble(sock: socket.socket, limit: int = 512) -> str:
    """One ``\\n``-terminated line (an auth preamble), read byte-exactly so nothing after it is consumed."""
    out = bytearray()
    while len(out) < limit:
        b = sock.recv(1)
        if not b:
            raise WireError("connection closed during the preamble")
        if b == b"\n":
            return out.decode(errors="replace")
        out += b
    raise WireError("preamble too long")


def send_tensor(sock: socket.socket, key: str, t: torch.Tensor, lock: threading.Lock) -> int:
    """Send one tensor (made contiguous) as a frame; returns payload bytes."""
    t = t.detach().contiguous()
    payload = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None
    nbytes = 0 if payload is None else payload.nbytes
    header = json.dumps({"key": key, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                         "nbytes": nbytes}).encode()
    with lock:
        sock.sendall(_LEN.pack(len(header)) + header)
        if payload is not None:
            view = memoryview(payload)
            for start in range(0, nbytes, CHUNK):
                sock.sendall(view[start:start + CHUNK])
    return nbytes


def recv_frame(sock: socket.socket, max_payload: int | None) -> tuple[dict, torch.Tensor | None]:
    """Read one frame. A payload over ``max_payload`` is read and discarded (the channel
    stays in step) and returned as ``None`` with ``header["refused"]`` set."""
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > _MAX_HEADER:
        raise WireError(f"frame header of {n} bytes is malformed")
    header = json.loads(_recv_exact(sock, n))
    nbytes = int(header["nbytes"])
    dtype = dtype_from_name(header["dtype"])
    if max_payload is not None and nbytes > max_payload:
        header["refused"] = f"a {nbytes}-byte tensor exceeds the worker's payload cap of {max_payload} bytes"
        scratch = bytearray(min(CHUNK, nbytes))
        left = nbytes
        while left:
            k = sock.recv_into(scratch, min(left, len(scratch)))
            if k == 0:
                raise WireError("data channel closed")
            left -= k
        return header, None
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        view = memoryview(buf.numpy())
        got = 0
        while got < nbytes:
            k = sock.recv_into(view[got:], min(CHUNK, nbytes - got))
            if k == 0:
                raise WireError("data channel closed")
            got += k
    t = buf.view(dtype) if nbytes else torch.empty(0, dtype=dtype)
    return header, t.reshape(header["shape"])


class Inbox:
    """Frames received by a reader thread, waited for by key."""

    def __init__(self) -> None:
        self._items: dict[str, torch.Tensor | str] = {}
        self._cond = threading.Condition()
        self.error: str | None = None

    def put(self, key: str, value: torch.Tensor | str) -> None:
        with self._cond:
            self._items[key] = value
            self._cond.notify_all()

    def fail(self, message: str) -> None:
        with self._cond:
            self.error = message
            self._cond.notify_all()

    def take(self, key: str, timeout: float) -> torch.Tensor | str:
        """The tensor (or refusal message) for ``key``; raises ``WireError`` on timeout or a broken channel."""
        with self._cond:
            self._cond.wait_for(lambda: key in self._items or self.error is not None, timeout)
            if key in self._items:
                return self._items.pop(key)
            raise WireError(self.error or f"tensor {key} did not arrive within {timeout:.0f}s")

    def reader(self, sock: socket.socket, max_payload: int | None, on_tensor=None) -> threading.Thread:
        """Start a daemon thread that reads frames into this inbox (or hands them to ``on_tensor``)."""

        def loop():
            try:
                while True:
                    header, t = recv_frame(sock, max_payload)
                    if t is None:
                        self.put(header["key"], header["refused"])
                    elif on_tensor is not None:
                        on_tensor(header["key"], t)
                        self.put(header["key"], "stored")
                    else:
                        self.put(header["key"], t)
            except (OSError, WireError, ValueError) as e:
                self.fail(f"data channel closed: {e}")

        thread = threading.Thread(target=loop, name="tapml-data-reader", daemon=True)
        thread.start()
        return thread

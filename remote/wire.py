"""The data channel: ops and tensors as length-prefixed frames on a plain socket.

Why not rpyc for this: rpyc's argument path moves bulk bytes at a few MB/s
(rpyc#398) and costs a thread handoff per call, so rpyc carries only control
calls (hello, prepare, stats) and each client has a second socket where a frame
is ``u32 header length | JSON header | payload``. Tensor frames carry raw bytes
written and read in chunks straight from/into tensor memory; a ``run`` frame
names the op and the content keys of its inputs; the worker answers with one
tensor frame per output and a ``reply`` frame.
"""

from __future__ import annotations

import json
import socket
import struct

import torch

from tapml.core import dtype_from_name, dtype_name

__all__ = ["CHUNK", "send_frame", "send_tensor", "recv_frame", "read_preamble", "WireError"]

CHUNK = 4 << 20
_LEN = struct.Struct("<I")
_MAX_HEADER = 16 << 20


class WireError(ConnectionError):
    """The data channel broke or carried something malformed."""


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], min(CHUNK, n - got))
        if k == 0:
            raise WireError("data channel closed")
        got += k


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


def send_frame(sock: socket.socket, header: dict, payload=None) -> None:
    data = json.dumps(header, separators=(",", ":")).encode()
    if payload is None or len(payload) <= 65536:  # small: one write, one packet
        sock.sendall(_LEN.pack(len(data)) + data + (bytes(payload) if payload is not None else b""))
        return
    sock.sendall(_LEN.pack(len(data)) + data)
    view = memoryview(payload)
    for start in range(0, len(view), CHUNK):
        sock.sendall(view[start:start + CHUNK])


def send_tensor(sock: socket.socket, key: str, t: torch.Tensor) -> int:
    """Send one tensor (made contiguous) as a frame; returns payload bytes."""
    t = t.detach().contiguous()
    payload = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else None
    nbytes = 0 if payload is None else payload.nbytes
    send_frame(sock, {"kind": "tensor", "key": key, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                      "nbytes": nbytes}, payload)
    return nbytes


def recv_frame(sock: socket.socket, max_payload: int | None = None) -> tuple[dict, torch.Tensor | None]:
    """Read one frame: ``(header, tensor or None)``. A tensor over ``max_payload`` is read
    and discarded (the channel stays in step) and reported in ``header["refused"]``."""
    head = bytearray(_LEN.size)
    _recv_exact_into(sock, memoryview(head))
    (n,) = _LEN.unpack(head)
    if n > _MAX_HEADER:
        raise WireError(f"frame header of {n} bytes is malformed")
    raw = bytearray(n)
    _recv_exact_into(sock, memoryview(raw))
    header = json.loads(raw)
    if header.get("kind") != "tensor":
        return header, None
    nbytes = int(header["nbytes"])
    dtype = dtype_from_name(header["dtype"])
    if max_payload is not None and nbytes > max_payload:
        header["refused"] = f"a {nbytes}-byte tensor exceeds the worker's payload cap of {max_payload} bytes"
        scratch = memoryview(bytearray(min(CHUNK, nbytes)))
        left = nbytes
        while left:
            k = sock.recv_into(scratch, min(left, len(scratch)))
            if k == 0:
                raise WireError("data channel closed")
            left -= k
        return header, None
    if not nbytes:
        return header, torch.empty(header["shape"], dtype=dtype)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    _recv_exact_into(sock, memoryview(buf.numpy()))
    return header, buf.view(dtype).reshape(header["shape"])

"""The data channel: ops and tensors as length-prefixed frames on a plain socket.

Why not rpyc for this: rpyc's argument path moves bulk bytes at a few MB/s
(rpyc#398) and costs a thread handoff per call, so rpyc carries only control
calls (hello, prepare, stats) and each client has a second socket where a frame
is ``u32 header length | JSON header | payload``. Tensor frames carry raw bytes
written and read in chunks straight from/into tensor memory; a ``run`` frame
names the op and the content keys of its inputs; the worker answers with one
tensor frame per output and a ``reply`` frame.

Everything read here comes from the network: headers are checked field by field
(``FrameError`` — the channel stays in step and the peer gets an error reply)
and anything that loses the framing is a ``WireError`` (the socket is closed).
"""

from __future__ import annotations

import json
import socket
import struct
import time

import torch

from tapml.core import MalformedValue, byte_view, check_spec, dtype_from_name, dtype_name

__all__ = ["CHUNK", "send_frame", "send_tensor", "recv_frame", "read_preamble", "check_run", "WireError",
           "FrameError"]

CHUNK = 4 << 20
_LEN = struct.Struct("<I")
_MAX_HEADER = 16 << 20
_MAX_KEY = 256


class WireError(ConnectionError):
    """The data channel broke or lost its framing: the socket must be closed."""


class FrameError(ValueError):
    """One frame's header is malformed but the channel is still in step: answer with an error."""


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], min(CHUNK, n - got))
        if k == 0:
            raise WireError("data channel closed")
        got += k


def read_preamble(sock: socket.socket, limit: int = 512, deadline_s: float = 5.0) -> str:
    """One ``\\n``-terminated line (an auth preamble), read byte-exactly so nothing after it is consumed.

    The whole line must arrive within ``deadline_s``: a client dripping one byte at a
    time cannot hold the socket."""
    out = bytearray()
    deadline = time.monotonic() + deadline_s
    try:
        while len(out) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WireError("no preamble within the deadline")
            sock.settimeout(left)
            b = sock.recv(1)
            if not b:
                raise WireError("connection closed during the preamble")
            if b == b"\n":
                return out.decode(errors="replace")
            out += b
    except TimeoutError:
        raise WireError("no preamble within the deadline") from None
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass
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
    """Send one tensor (its elements in logical order) as a frame; returns payload bytes."""
    payload = byte_view(t) if t.numel() else None
    nbytes = 0 if payload is None else payload.nbytes
    send_frame(sock, {"kind": "tensor", "key": key, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                      "nbytes": nbytes}, payload)
    return nbytes


def _discard(sock: socket.socket, nbytes: int) -> None:
    scratch = memoryview(bytearray(min(CHUNK, nbytes)))
    left = nbytes
    while left:
        k = sock.recv_into(scratch, min(left, len(scratch)))
        if k == 0:
            raise WireError("data channel closed")
        left -= k


def _tensor_problem(header: dict) -> str | None:
    key = header.get("key")
    if not isinstance(key, str) or not 0 < len(key) <= _MAX_KEY:
        return "a tensor frame needs a string key"
    try:
        check_spec({"dtype": header.get("dtype"), "shape": header.get("shape"),
                    "stride": [0] * len(header["shape"]) if isinstance(header.get("shape"), list) else None})
    except MalformedValue as e:
        return f"tensor {key[:40]}: {e}"
    numel = 1
    for s in header["shape"]:
        numel *= s
    if numel * dtype_from_name(header["dtype"]).itemsize != header["nbytes"]:
        return f"tensor {key[:40]}: {header['nbytes']} bytes do not hold {header['shape']} {header['dtype']}"
    return None


def recv_frame(sock: socket.socket, max_payload: int | None = None,
               frame_s: float | None = None) -> tuple[dict, torch.Tensor | None]:
    """Read one frame: ``(header, tensor or None)``.

    A tensor frame that is refused — over ``max_payload`` or malformed but with a readable
    size — has its payload read and discarded (the channel stays in step) and says why in
    ``header["refused"]``. A header that is not a JSON object is a ``WireError``."""
    head = bytearray(_LEN.size)
    _recv_exact_into(sock, memoryview(head))  # a peer may stay idle between frames as long as it likes,
    if frame_s is not None:  # but a frame it has begun must keep arriving
        sock.settimeout(frame_s)
    try:
        return _recv_rest(sock, head, max_payload)
    except TimeoutError:
        raise WireError(f"a frame stalled for {frame_s:.0f}s") from None
    finally:
        if frame_s is not None:
            sock.settimeout(None)


def _recv_rest(sock: socket.socket, head: bytearray, max_payload: int | None) -> tuple[dict, torch.Tensor | None]:
    (n,) = _LEN.unpack(head)
    if n > _MAX_HEADER:
        raise WireError(f"frame header of {n} bytes is malformed")
    raw = bytearray(n)
    _recv_exact_into(sock, memoryview(raw))
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise WireError("a frame header is not JSON") from None
    if not isinstance(header, dict):
        raise WireError("a frame header is not a JSON object")
    if header.get("kind") != "tensor":
        return header, None
    nbytes = header.get("nbytes")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise WireError("a tensor frame without a valid byte count")
    problem = _tensor_problem(header)
    if problem is None and max_payload is not None and nbytes > max_payload:
        problem = f"a {nbytes}-byte tensor exceeds the worker's payload cap of {max_payload} bytes"
    if problem is not None:
        _discard(sock, nbytes)
        header["refused"] = problem
        return header, None
    dtype = dtype_from_name(header["dtype"])
    if not nbytes:
        return header, torch.empty(header["shape"], dtype=dtype)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    _recv_exact_into(sock, memoryview(buf.numpy()))
    return header, buf.view(dtype).reshape(header["shape"])


def _int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def check_run(header: dict) -> None:
    """A ``run`` frame's fields, or ``FrameError`` naming the first bad one."""
    if not isinstance(header.get("sig"), str) or not 0 < len(header["sig"]) <= _MAX_KEY:
        raise FrameError("run: sig must be a string")
    if not _int(header.get("index"), -1) or not _int(header.get("call")):
        raise FrameError("run: index and call must be integers")
    if not isinstance(header.get("module"), str):
        raise FrameError("run: module must be a string")
    keys = header.get("keys")
    if not isinstance(keys, list) or len(keys) > 4096:
        raise FrameError("run: keys must be a list")
    for k in keys:
        if isinstance(k, str):
            continue
        if not isinstance(k, dict) or not isinstance(k.get("base"), str) or not _int(k.get("offset")):
            raise FrameError("run: a key is a content key or {base, shape, stride, offset}")
        try:
            check_spec({"dtype": "uint8", "shape": k.get("shape"), "stride": k.get("stride")})
        except MalformedValue as e:
            raise FrameError(f"run: a view key: {e}") from None
    if "op" in header and not isinstance(header["op"], dict):
        raise FrameError("run: op must be an object")

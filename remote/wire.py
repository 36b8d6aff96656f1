"""The data channel: ops and tensors as length-prefixed frames on a plain socket.

Why not rpyc for this: rpyc's argument path moves bulk bytes at a few MB/s
(rpyc#398) and costs a thread handoff per call, so rpyc carries only control
calls (hello, prepare, stats) and each client has a second socket where a frame
is ``u32 header length | JSON header | payload``. Tensor frames carry raw bytes
written and read in chunks straight from/into tensor memory; a ``run`` frame
names the op and the content keys of its inputs; the worker answers with one
tensor frame per output and a ``reply`` frame. A pipelined run names its outputs
so later runs can take them before the answer is read; a ``release`` frame (no
reply) tells the worker which names the client will not use again.

The op-run path has a binary form (``calls``): frames whose length word is a
magic number above the header cap are handed to a parser the caller names.

Everything read here comes from the network: headers are checked field by field
(``FrameError`` — the channel stays in step and the peer gets an error reply)
and anything that loses the framing is a ``WireError`` (the socket is closed).
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable

import torch

from tapml.core import MalformedValue, byte_view, check_spec, dtype_from_name, dtype_name

__all__ = ["CHUNK", "BINARY_MIN", "MAX_RELEASE", "FrameReader", "frame_buffers", "tensor_buffers", "send_buffers",
           "send_frame", "send_tensor", "recv_frame", "read_preamble", "check_run", "WireError", "FrameError"]

CHUNK = 4 << 20
_LEN = struct.Struct("<I")
_MAX_HEADER = 16 << 20
BINARY_MIN = 0xFFFF_0000  # a length word at or above this starts a binary frame (``calls``), not a JSON header
_MAX_KEY = 256
_IOV_MAX = 512  # buffers per sendmsg (Linux allows 1024)
MAX_RELEASE = 4096  # names in one release frame


class WireError(ConnectionError):
    """The data channel broke or lost its framing: the socket must be closed."""


class FrameError(ValueError):
    """One frame's header is malformed but the channel is still in step: answer with an error."""


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


def frame_buffers(header: dict, payload=None) -> list:
    """One frame as buffers for ``send_buffers``: the length-prefixed header, then the payload as is."""
    data = json.dumps(header, separators=(",", ":")).encode()
    head = _LEN.pack(len(data)) + data
    return [head] if payload is None or not len(payload) else [head, payload]


def tensor_buffers(key: str, t: torch.Tensor, payload: memoryview | None = None) -> tuple[list, int]:
    """One tensor (its elements in logical order) as frame buffers, and its payload bytes; no copy of
    a contiguous tensor's memory (``payload``: its ``byte_view``, when the caller has it)."""
    if payload is None and t.numel():
        payload = byte_view(t)
    nbytes = 0 if payload is None else payload.nbytes
    return frame_buffers({"kind": "tensor", "key": key, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                          "nbytes": nbytes}, payload), nbytes


def send_buffers(sock: socket.socket, buffers: list) -> None:
    """Write ``buffers`` in order with as few ``sendmsg`` calls as the kernel allows: small frames
    travel together in one packet, large payloads straight from tensor memory."""
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first:first + _IOV_MAX])
        while first < len(views) and sent >= len(views[first]):
            sent -= len(views[first])
            first += 1
        if sent:
            views[first] = views[first][sent:]


def send_frame(sock: socket.socket, header: dict, payload=None) -> None:
    send_buffers(sock, frame_buffers(header, payload))


def send_tensor(sock: socket.socket, key: str, t: torch.Tensor) -> int:
    """Send one tensor as a frame; returns payload bytes."""
    buffers, nbytes = tensor_buffers(key, t)
    send_buffers(sock, buffers)
    return nbytes


class FrameReader:
    """Frames from one socket. Buffered: a burst of small frames costs one ``recv``; a large payload is
    received straight into the destination tensor's memory. Unbuffered (``buffered=False``) it never
    reads past the frame, so a caller can go on reading the socket directly."""

    def __init__(self, sock: socket.socket, buffered: bool = True, size: int = 256 << 10):
        self.sock, self.buffered = sock, buffered
        self._buf = bytearray(size if buffered else 0)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._frame_s: float | None = None  # the stall limit of the frame being read
        self._armed = False  # the socket's timeout is set to it (only once a frame needs another recv)

    def _recv_into(self, dst: memoryview, n: int = 0) -> int:
        if self._frame_s is not None and not self._armed:  # a frame that arrived whole costs no timeout syscalls
            self.sock.settimeout(self._frame_s)
            self._armed = True
        k = self.sock.recv_into(dst, n)
        if k == 0:
            raise WireError("data channel closed")
        return k

    def _fill(self, need: int) -> None:
        """At least ``need`` (≤ the buffer's size) bytes buffered."""
        if self._end - self._start >= need:
            return
        if self._start:
            held = self._end - self._start
            self._view[:held] = self._view[self._start:self._end]
            self._start, self._end = 0, held
        while self._end < need:
            self._end += self._recv_into(self._view[self._end:])

    def read_into(self, dst: memoryview) -> None:
        """Fill ``dst`` exactly: what is buffered first, then straight from the socket."""
        n, got = len(dst), min(len(dst), self._end - self._start)
        if got:
            dst[:got] = self._view[self._start:self._start + got]
            self._start += got
        while got < n:
            got += self._recv_into(dst[got:], min(CHUNK, n - got))

    def unpack(self, fmt: struct.Struct) -> tuple:
        """The next ``fmt.size`` bytes, unpacked (for binary frames)."""
        if self.buffered:
            self._fill(fmt.size)
            out = fmt.unpack_from(self._buf, self._start)
            self._start += fmt.size
            return out
        return fmt.unpack(self._exact(fmt.size))

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes (a view into the buffer: use it before the next read)."""
        return self._exact(n)

    def _exact(self, n: int) -> memoryview:
        if self.buffered and n <= len(self._buf):
            self._fill(n)
            out = self._view[self._start:self._start + n]
            self._start += n
            return out
        out = memoryview(bytearray(n))
        self.read_into(out)
        return out

    def pending(self) -> bool:
        return self._end > self._start

    def discard(self, nbytes: int) -> None:
        """Read past ``nbytes`` of payload (a refused one): the channel stays in step."""
        scratch = memoryview(bytearray(min(CHUNK, nbytes)))
        while nbytes:
            k = min(nbytes, len(scratch))
            self.read_into(scratch[:k])
            nbytes -= k

    def read(self, max_payload: int | None = None, frame_s: float | None = None,
             binary: Callable | None = None) -> tuple[dict, torch.Tensor | None]:
        """One frame: ``(header, tensor or None)``.

        A tensor frame that is refused — over ``max_payload`` or malformed but with a readable
        size — has its payload read and discarded (the channel stays in step) and says why in
        ``header["refused"]``. A header that is not a JSON object is a ``WireError``. A binary
        frame is parsed by ``binary(reader, magic, max_payload)``, which returns its header
        (without it, a binary frame is a ``WireError``)."""
        head = None
        if self.buffered:  # a peer may stay idle between frames as long as it likes,
            self._fill(1)
        else:
            head = self._exact(_LEN.size)
        self._frame_s = frame_s  # but a frame it has begun must keep arriving
        try:
            (n,) = _LEN.unpack(head) if head is not None else self.unpack(_LEN)
            if n >= BINARY_MIN and binary is not None:
                return binary(self, n, max_payload), None
            return self._rest(n, max_payload)
        except TimeoutError:
            if frame_s is None:
                raise  # the caller's own timeout: it decides what a stall means
            raise WireError(f"a frame stalled for {frame_s:.0f}s") from None
        finally:
            self._frame_s = None
            if self._armed:
                self._armed = False
                self.sock.settimeout(None)

    def _rest(self, n: int, max_payload: int | None) -> tuple[dict, torch.Tensor | None]:
        if n > _MAX_HEADER:
            raise WireError(f"frame header of {n} bytes is malformed")
        raw = self._exact(n)
        try:
            header = json.loads(bytes(raw))
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
            self.discard(nbytes)
            header["refused"] = problem
            return header, None
        dtype = dtype_from_name(header["dtype"])
        if not nbytes:
            return header, torch.empty(header["shape"], dtype=dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8)  # kept by the receiver: the payload lands in it directly
        self.read_into(memoryview(buf.numpy()))
        return header, buf.view(dtype).reshape(header["shape"])


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
    """Read one frame from ``sock`` without reading past it (see ``FrameReader.read``)."""
    return FrameReader(sock, buffered=False).read(max_payload, frame_s)


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
    names = header.get("names", [])
    if (not isinstance(names, list) or len(names) > 4096
            or not all(isinstance(n, str) and 0 < len(n) <= _MAX_KEY for n in names)):
        raise FrameError("run: names must be a list of keys")

"""Fuzz tapml's two untrusted inputs: the worker's sockets, and fixture stores on disk.

Why: a worker serves whoever holds its token and a store may come from anyone, so
malformed input must cost one error reply, one closed socket or one exit-2 line,
never a traceback, a hung thread, a dead worker, a file read outside the store, or
tampered tensor bytes replayed as if genuine.

Part 1 spawns a real worker (loopback, token, 1 MiB payload cap, 8 GiB address-space
limit) and throws malformed data-channel frames at it, each followed by a probe op whose
answer is recognizable and checked, plus bad preambles and control calls; valid carved
ops in between must still return the recorded answer. Part 2 carves a tiny model, writes
mutated manifests (resealed like ``carving/store.py:_seal``) and damaged shards, and runs
``tapml inspect`` and ``tapml replay --json`` on each (``case-N/case.json`` says what was
done and what came back). Those runs are forked from a process that imported tapml once
(a cold ``tapml`` costs ~1.5 s here); ``--exec-sample`` reruns some with the real
executable to check both give the same exit codes.

Usage: python benchmarks/fuzz.py [--frames 1000] [--manifests 1000] [--seed 0] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import queue
import random
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LEN = struct.Struct("<I")
_MAX_HEADER = 16 << 20
# binary call/outputs frames (remote/calls.py), as a client writes and reads them
CALL_MAGIC, OUTPUTS_MAGIC = 0xFFFF_0000 + 0xCA11, 0xFFFF_0000 + 0x0A75
NAMED_MAGIC = 0xFFFF_0000 + 0xCA12  # a call frame whose outputs the client names (pipelined runs)
_CALL = struct.Struct("<IIqqHH")  # magic, handle, index, call, module bytes, inputs
_INPUT = struct.Struct("<B16sQ")  # kind (0 held, 1 inline), key, payload bytes
_OUT_HEAD = struct.Struct("<dH")
_OUT = struct.Struct("<BBQ16s")
MAX_PAYLOAD = 1 << 20  # the spawned worker's cap: over-cap frames stay cheap to send
TB = "Traceback (most recent call last)"
_DEEP = "\x00deep:"
OLD_TIMES = (1_000_000_000_000_000_000, 1_000_000_010_000_000_000)  # (atime, mtime) in ns


# -- JSON with nesting deeper than json.dumps allows, and resealing ----------------------------
def deep(n: int) -> str:
    """A placeholder that ``dumps`` expands to ``n`` nested empty lists."""
    return f"{_DEEP}{n}"


def dumps(obj: Any) -> str:
    text = json.dumps(obj, separators=(",", ":"))
    return re.sub(r'"\\u0000deep:(\d+)"', lambda m: "[" * int(m[1]) + "]" * int(m[1]), text)


def seal_text(text: str) -> str:
    """``carving/store.py:_seal`` on already serialized body text."""
    return seal_bytes(text.encode()).decode()


def seal_bytes(raw: bytes) -> bytes:
    """The same on raw bytes (a byte flip may leave invalid UTF-8)."""
    return raw[:-1] + b',"digest":"' + hashlib.sha256(raw).hexdigest().encode() + b'"}'


def frame(header: Any, payload: bytes = b"") -> bytes:
    raw = (header if isinstance(header, bytes) else dumps(header).encode())
    return _LEN.pack(len(raw)) + raw + payload


def _short(x: Any, n: int = 160) -> str:
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[:n] + f"...(+{len(s) - n})"


WEIRD: list[Any] = [None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -2**63, 10**30, 1.5, -0.0, 1e308,
                    float("nan"), float("inf"), "", "x", "1", "_dynamo", "__class__", "A" * 10000, [], [-1], [2.5],
                    [[]], [None], {}, {"a": 1}, {"tensor": {}}, deep(40), deep(5000)]


# -- part 1: the worker -------------------------------------------------------------------------
class Closed(Exception):
    pass


class NoAnswer(Exception):
    pass


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoAnswer
        sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:], min(n - got, 1 << 22))
        except TimeoutError:
            raise NoAnswer from None
        except OSError:
            raise Closed from None
        if k == 0:
            raise Closed
        got += k
    return buf


def read_frame(sock: socket.socket, deadline: float) -> tuple[dict, bytearray]:
    (n,) = _LEN.unpack(_recv_exact(sock, 4, deadline))
    if n == OUTPUTS_MAGIC:  # a binary call's answer: every output's payload, concatenated
        _, count = _OUT_HEAD.unpack(_recv_exact(sock, _OUT_HEAD.size, deadline))
        payload = bytearray()
        for _ in range(count):
            _, ndim, nbytes, _ = _OUT.unpack(_recv_exact(sock, _OUT.size, deadline))
            _recv_exact(sock, 8 * ndim, deadline)
            payload += _recv_exact(sock, nbytes, deadline)
        return {"kind": "outputs", "ok": True}, payload
    header = json.loads(_recv_exact(sock, n, deadline))
    payload = _recv_exact(sock, int(header.get("nbytes", 0)), deadline) if header.get("kind") == "tensor" else b""
    return header, payload


class Session:
    """One authenticated client: an rpyc control connection and its data socket."""

    def __init__(self, host: str, port: int, token: str):
        import rpyc

        ctrl = socket.create_connection((host, port), timeout=5)
        ctrl.sendall(f"TAPML1 {token}\n".encode())
        ctrl.settimeout(None)
        self.conn = rpyc.utils.factory.connect_stream(rpyc.SocketStream(ctrl), config={
            "allow_pickle": False, "allow_public_attrs": False, "sync_request_timeout": 10})
        self.info = json.loads(self.conn.root.hello())
        self.data = socket.create_connection((host, self.info["data_port"]), timeout=5)
        self.data.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.data.sendall(f"TAPMLDATA {self.info['nonce']}\n".encode())

    def close(self) -> None:
        for closer in (self.data.close, self.conn.close):
            try:
                closer()
            except Exception:
                pass


@dataclass
class Probe:
    """A gelu run with its own input and output shape ``[1, n]``: its reply is recognizable after any other."""

    raw: bytes
    shape: list[int]
    expected: bytes


def make_probe(i: int) -> Probe:
    import torch

    from tapml.core import content_key

    n = 17 + i % 997
    x = torch.linspace(-3.0, 3.0 + i * 1e-3, n)
    spec = {"dtype": "float32", "shape": [1, n], "stride": [n, 1]}
    key = content_key(x)
    op = {"op": "aten.gelu.default", "args": [{"tensor": spec}], "kwargs": {"dict": {}}, "outputs": {"tensor": spec},
          "module": "", "index": 0, "call": 0}
    raw = frame({"kind": "tensor", "key": key, "dtype": "float32", "shape": [n], "nbytes": 4 * n},
                x.numpy().tobytes()) + frame({"kind": "run", "sig": f"fuzz-probe-{n}", "index": 0, "module": "",
                                              "call": 0, "keys": [key], "op": op})
    return Probe(raw, [1, n], torch.ops.aten.gelu.default(x.reshape(1, n)).numpy().tobytes())


def exchange(sock: socket.socket, raw: bytes, probe: Probe, timeout: float) -> tuple[str, list[dict], str, bytes]:
    """Send ``raw`` then ``probe``; read until the probe's reply:
    ``(outcome, replies to raw, probe verdict, tensor bytes sent back for raw)``."""
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.sendall(raw + probe.raw)
    except TimeoutError:
        return "no-answer", [], "", b""
    except OSError:
        return "closed", [], "", b""
    own: list[dict] = []
    outs = bytearray()
    probe_out = None
    try:
        while True:
            header, payload = read_frame(sock, deadline)
            if probe_out is None and header.get("kind") == "tensor" and header.get("shape") == probe.shape:
                probe_out = bytes(payload)
            elif header.get("kind") == "reply" and probe_out is not None:
                ok = header.get("ok") and probe_out == probe.expected
                return "answered", own, "ok" if ok else f"wrong answer {header}", bytes(outs)
            elif header.get("kind") == "reply":
                own.append(header)
            elif header.get("kind") == "outputs":  # a call frame ran
                own.append(header)
                outs += payload[:1 << 16]
            else:
                outs += payload[:1 << 16]
    except NoAnswer:
        return "no-answer", own, "", bytes(outs)
    except (Closed, ValueError):
        return "closed", own, "", bytes(outs)


def read_reply(sock: socket.socket, raw: bytes, timeout: float) -> tuple[str, dict, list]:
    """Send ``raw`` (one run) and read up to its reply: ``(outcome, reply, output frames)``."""
    deadline = time.monotonic() + timeout
    outs: list = []
    try:
        sock.settimeout(timeout)
        sock.sendall(raw)
        while True:
            header, payload = read_frame(sock, deadline)
            if header.get("kind") == "reply":
                return "answered", header, outs
            if header.get("kind") == "outputs":
                return "answered", header, [(header, payload)]
            outs.append((header, payload))
    except (NoAnswer, TimeoutError):
        return "no-answer", {}, outs
    except (Closed, OSError, ValueError):
        return "closed", {}, outs


def simulate(raw: bytes, max_payload: int) -> tuple[str, int]:
    """How ``raw`` parses: ``("complete"|"closes"|"incomplete", run frames)``; only an incomplete frame may
    leave the worker waiting."""
    replies, pos = 0, 0
    while pos < len(raw):
        if len(raw) - pos < 4:
            return "incomplete", replies
        (n,) = _LEN.unpack_from(raw, pos)
        if n in (CALL_MAGIC, NAMED_MAGIC):
            pos, state = _simulate_call(raw, pos)
            if state != "complete":
                return state, replies
            replies += 1
            continue
        if n > _MAX_HEADER:
            return "closes", replies
        if len(raw) - pos - 4 < n:
            return "incomplete", replies
        try:
            header = json.loads(raw[pos + 4:pos + 4 + n])
        except (ValueError, RecursionError):
            return "closes", replies
        pos += 4 + n
        if not isinstance(header, dict):
            return "closes", replies
        if header.get("kind") == "tensor":
            try:
                nbytes = int(header["nbytes"])
            except (KeyError, TypeError, ValueError, OverflowError):
                return "closes", replies
            if nbytes < 0:
                return "closes", replies
            if len(raw) - pos < nbytes:
                return "incomplete", replies
            pos += nbytes
        elif header.get("kind") == "run":
            replies += 1
    return "complete", replies


def _simulate_call(raw: bytes, pos: int) -> tuple[int, str]:
    """One binary call frame at ``pos``: ``(end, "complete"|"closes"|"incomplete")``. The worker reads every
    entry (a refused payload is read past); only an unknown input kind loses the framing."""
    if len(raw) - pos < _CALL.size:
        return pos, "incomplete"
    magic, *_, module_len, n = _CALL.unpack_from(raw, pos)
    pos += _CALL.size + module_len
    for _ in range(n):
        if len(raw) - pos < _INPUT.size:
            return pos, "incomplete"
        kind, _, nbytes = _INPUT.unpack_from(raw, pos)
        pos += _INPUT.size
        if kind == 2:  # a view of a held tensor: its rank, then that many strides
            if len(raw) - pos < 1:
                return pos, "incomplete"
            pos += 1 + 8 * raw[pos]
            continue
        if kind > 2:
            return pos, "closes"
        if kind == 1:
            pos += nbytes
    if magic == NAMED_MAGIC:
        if len(raw) - pos < 2:
            return pos, "incomplete"
        pos += 2 + 16 * struct.unpack_from("<H", raw, pos)[0]
    return pos, "complete" if pos <= len(raw) else "incomplete"


def call_frame(handle: int, inputs: list[tuple[int, bytes, bytes]], index: int = 0, call: int = 0,
               module: bytes = b"", count: int | None = None, names: bytes | None = None) -> bytes:
    """A binary call frame; each input ``(kind, key bytes, payload)`` (the payload only for kind 1);
    ``names``: the raw output-names section of a named call frame."""
    magic = CALL_MAGIC if names is None else NAMED_MAGIC
    raw = _CALL.pack(magic, handle, index, call, len(module), len(inputs) if count is None else count) + module
    for kind, key, payload in inputs:
        raw += _INPUT.pack(kind, key, len(payload) if kind == 1 else 0) + (payload if kind == 1 else b"")
    return raw + (names or b"")


@dataclass
class ValidOp:
    """A carved op as the client sends it: tensor uploads, a run frame, the recorded outputs."""

    name: str
    uploads: bytes
    run: dict
    expected: list  # torch tensors

    def raw(self) -> bytes:
        return self.uploads + frame(self.run)


def valid_ops(store_dir: Path) -> list[ValidOp]:
    import torch

    from tapml.carving import FixtureStore
    from tapml.core import content_key, dtype_name

    store = FixtureStore(store_dir)
    out = []
    for index in (2, 3):  # addmm (a transposed weight travels as a view ref), gelu
        op = store.op_call(index)
        uploads, refs = b"", []
        for t in store.inputs(index):
            storage_numel = t.untyped_storage().nbytes() // t.element_size()
            whole = t.is_contiguous() and t.storage_offset() == 0 and t.numel() == storage_numel
            base = t.contiguous().reshape(-1) if whole else \
                torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (storage_numel,), (1,))
            key = content_key(base)
            data = base.view(torch.uint8).numpy().tobytes()
            uploads += frame({"kind": "tensor", "key": key, "dtype": dtype_name(base.dtype), "shape": [base.numel()],
                              "nbytes": len(data)}, data)
            refs.append(key if whole else {"base": key, "shape": list(t.shape), "stride": list(t.stride()),
                                           "offset": t.storage_offset()})
        run = {"kind": "run", "sig": op.signature, "index": index, "module": op.module, "call": 0, "keys": refs,
               "op": op.to_json()}
        out.append(ValidOp(op.op, uploads, run, store.outputs(index)))
    return out


def check_valid(sock: socket.socket, op: ValidOp, timeout: float = 10.0) -> str:
    """``op`` by a JSON run frame; then, when every input is a whole tensor, again by a binary call frame
    naming the plan the reply gave and the inputs the worker now holds."""
    outcome, reply, outs = read_reply(sock, op.raw(), timeout)
    if outcome != "answered":
        return outcome
    if not reply.get("ok"):
        return f"error reply {reply}"
    verdict = _same(outs, op.expected)
    if verdict != "ok" or not all(isinstance(k, str) for k in op.run["keys"]) or "handle" not in reply:
        return verdict
    held = [(0, bytes.fromhex(k), b"") for k in op.run["keys"]]
    outcome, answer, outs = read_reply(sock, call_frame(reply["handle"], held, index=op.run["index"]), timeout)
    if outcome != "answered" or not answer.get("ok"):
        return f"binary call: {outcome} {answer}"
    return _same(outs, op.expected)


def _same(outs: list, expected: list) -> str:
    """Output frames ``(header, payload)`` (a binary answer: one, every payload concatenated) against the
    recorded outputs, byte for byte."""
    import torch

    if len(outs) != len(expected) and not (len(outs) == 1 and outs[0][0].get("kind") == "outputs"):
        return f"wrong: {len(outs)} outputs"
    want = b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in expected)
    return "ok" if b"".join(bytes(p) for _, p in outs) == want else "wrong answer"


# frame generators: (family, label, raw bytes)
Gen = tuple[str, str, bytes]

DANGEROUS_OPS = [
    "aten.from_file.default", "load_library.__call__.__call__", "aten._print.default", "aten.set_.source_Storage",
    "aten.record_stream.default", "aten._make_dep_token.default", "aten._assert_async.msg",
    "aten.sym_constrain_range.default", "builtins.eval.default", "os.system.default", "torch._C._x.default",
    "_dynamo.x.default", "aten.__getattribute__.default", "aten.add.__call__", "aten.add.__class__",
    "aten.add.Tensor.extra", "aten..default", "", "aten.add", "ATEN.add.Tensor", "prims.device_put.default",
    "profiler._record_function_enter.default", "aten.__init__.default", "aten.add.__init__", "aten.add.default",
    "aten._local_scalar_dense.default", "aten.sym_size.int", "aten.as_strided_.default", "aten.resize_.default",
    "aten.set_.source_Tensor", "quantized.linear.default", "c10d.broadcast_.default", "aten.save.default",
    "aten._foreach_add.Scalar", "aten.lift_fresh.default", "ops.aten.add.Tensor", "aten.add.Tensor ",
]
RAN_IS_FINDING = ("op.name", "op.resource", "op.args", "op.kwargs", "run.view", "run.keys", "deep")
# ops a worker should refuse for a client (tapml.core.ops.remote_refusal) or that stress it
RESOURCE_OPS: list[tuple[str, list, dict]] = [
    ("aten.empty.memory_format", [[64]], {}),  # uninitialized worker memory
    ("aten.randn.default", [[16]], {}),  # changes the worker's RNG state
    ("aten.zeros.default", [[2**40]], {}),
    ("aten.zeros.default", [[1 << 31]], {}),  # 8 GiB: over the worker's address-space limit
    ("aten.ones.default", [[1 << 24]], {}),  # 64 MiB output, no output cap
    ("aten.arange.default", [2**62], {}),
    ("aten.full.default", [[2**31, 2**31], 1.0], {}),
]


def _opjson(name: str, args: Any, kwargs: Any = None, outputs: Any = None) -> dict:
    return {"op": name, "args": args, "kwargs": kwargs if kwargs is not None else {"dict": {}},
            "outputs": outputs if outputs is not None else {"tensor": {"dtype": "float32", "shape": [16],
                                                                        "stride": [1]}},
            "module": "", "index": 0, "call": 0}


def _run(op: dict, keys: list, sig: str = "fuzz-op") -> dict:
    return {"kind": "run", "sig": sig, "index": 0, "module": "", "call": 0, "keys": keys, "op": op}


def gen_frames(rng: random.Random, n: int, ops: list[ValidOp], canary: str) -> list[Gen]:
    addmm = ops[0]
    base_t = {"kind": "tensor", "key": "k" * 32, "dtype": "float32", "shape": [2, 8], "nbytes": 64}
    fixed: list[Gen] = []

    def add(family: str, label: str, raw: bytes) -> None:
        fixed.append((family, label, raw))

    # framing
    add("framing", "1-byte length prefix", b"\x05")
    add("framing", "3-byte length prefix", b"\x05\x00\x00")
    add("framing", "header length 0", _LEN.pack(0))
    add("framing", "header length 2^32-1", _LEN.pack(2**32 - 1))
    add("framing", "header length 16MiB+1", _LEN.pack(_MAX_HEADER + 1))
    add("framing", "header length 16MiB, 1 byte sent", _LEN.pack(_MAX_HEADER) + b"{")
    add("framing", "header length 100, 2 bytes sent", _LEN.pack(100) + b"{}")
    for body in [b"hello", b"\xff\xfe\xfd", b"{'kind':'run'}", b'{"kind":', b"NaN", b"1e999999", b"\xef\xbb\xbf{}",
                 b'{"kind":"run","kind":"tensor"}', b"{}", b'{"kind":null}', b'{"kind":5}', b'{"kind":["run"]}',
                 b'{"kind":{"a":1}}', b'{"kind":"reply","ok":true}', b'{"kind":"RUN"}', b"\x00" * 8]:
        add("framing", f"header {_short(body, 40)}", frame(body))
    for body in ["[]", "[1,2]", "5", '"str"', "null", "true", "1.5", '"tensor"']:
        add("not-object", f"header JSON {body}", frame(body.encode()))
    for depth in (100, 1000, 100000):
        add("deep", f"header nested {depth} lists", frame(("[" * depth + "]" * depth).encode()))
    add("deep", "run op nested 100000 lists", frame(dumps(_run(deep(100000), [])).encode()))
    add("deep", "run op.args nested 500", frame(dumps(_run(_opjson("aten.add.Tensor", deep(500)), [])).encode()))
    add("framing", "8 MiB junk header", frame(dumps({"kind": "junk", "x": "A" * (8 << 20)}).encode()))
    # tensor frames: every field x weird values
    tensor_vals: dict[str, list[Any]] = {
        "key": WEIRD + [[1], {"a": 1}, "k" * 100000],
        "dtype": WEIRD + ["float", "Tensor", "torch.float32", "float32 ", "FLOAT32", "qint8", "quint8", "complex32",
                          "float8_e4m3fn", "bool", "uint64", "_C", "nn", "ops", "__builtins__", "float32\x00"],
        "shape": WEIRD + [[-2, -32], [2.5, 8], [16], [4, 4], [1] * 64, [1] * 65, [2**62, 2**62], [0], [64, 0],
                          "2,8", [True, 8], [[2], 8], [-1, 16]],
        "nbytes": WEIRD + [-64, 63, 65, 1 << 30, (1 << 20) + 1, "64", "0x40", 64.0, 64.9, [64], 1e300],
        "kind": ["tensor ", "Tensor", ["tensor"]],
    }
    for fld, vals in tensor_vals.items():
        for v in vals + ["<missing>"]:
            h = dict(base_t)
            if v == "<missing>":
                del h[fld]
            else:
                h[fld] = v
            nb = h.get("nbytes")
            size = nb if isinstance(nb, int) and not isinstance(nb, bool) and 0 <= nb <= MAX_PAYLOAD else \
                (64 if fld != "nbytes" else 0)
            add(f"tensor.{fld}", f"tensor {fld}={_short(v, 60)}", frame(h, bytes(size)))
    # over the payload cap: the worker reads and discards, then records the key as refused
    for key in ["big", 5, [1], {"a": 1}, None]:
        h = dict(base_t, key=key, nbytes=MAX_PAYLOAD + 8, shape=[(MAX_PAYLOAD + 8) // 4])
        add("tensor.refused", f"over-cap tensor key={_short(key)}", frame(h, bytes(MAX_PAYLOAD + 8)))
    add("tensor.refused", "over-cap tensor then run naming it",
        frame(dict(base_t, key="big", nbytes=MAX_PAYLOAD + 8), bytes(MAX_PAYLOAD + 8))
        + frame(dict(addmm.run, keys=["big"] + addmm.run["keys"][1:])))
    # run frames: every field x weird values, after the valid uploads
    run_vals: dict[str, list[Any]] = {
        "sig": WEIRD + [[1], {"a": 1}],
        "index": WEIRD, "module": WEIRD, "call": WEIRD,
        "keys": WEIRD + [addmm.run["keys"][:2], addmm.run["keys"] * 2, [5, 6, 7], [[1], [2], [3]],
                         [{"a": 1}] * 3, ["missing"] * 3],
        "op": WEIRD + [[1], {"op": "aten.add.Tensor"}],
    }
    for fld, vals in run_vals.items():
        for v in vals + ["<missing>"]:
            h = dict(addmm.run)
            if v == "<missing>":
                del h[fld]
            else:
                h[fld] = v
            add(f"run.{fld}", f"run {fld}={_short(v, 60)}", addmm.uploads + frame(h))
    # view refs into a held tensor
    weight = next(r for r in addmm.run["keys"] if isinstance(r, dict))
    for change in [{"shape": [100, 100]}, {"shape": [-1, 8]}, {"stride": [-1, 8]}, {"stride": [1]},
                   {"stride": [2**62, 2**62]}, {"offset": 10**6}, {"offset": -1}, {"offset": 1.5},
                   {"offset": 2**63}, {"shape": [8, 8, 8]}, {"base": [1]}, {"base": None}, {"shape": None},
                   {"stride": "x"}, {"shape": [2**31, 2**31], "stride": [0, 0]}, {"offset": 63},
                   {"shape": [0, 8]}, {"base": "missing"}]:
        ref = dict(weight, **change)
        keys = [ref if isinstance(r, dict) else r for r in addmm.run["keys"]]
        add("run.view", f"view ref {change}", addmm.uploads + frame(dict(addmm.run, keys=keys)))
    # op JSON: every field x weird values, then names and argument encodings
    for fld in ("op", "args", "kwargs", "outputs", "module", "index", "call"):
        for v in WEIRD + ["<missing>"]:
            op = dict(addmm.run["op"])
            if v == "<missing>":
                del op[fld]
            else:
                op[fld] = v
            add(f"op.{fld}", f"op {fld}={_short(v, 60)}", addmm.uploads + frame(dict(addmm.run, op=op, sig="x")))
    for name in DANGEROUS_OPS:
        args = [canary, False, 16] if "from_file" in name else ["TAPMLFUZZ"] if "_print" in name else \
            addmm.run["op"]["args"]
        keys = [] if "from_file" in name or "_print" in name else addmm.run["keys"]
        add("op.name", f"op name {name!r}", addmm.uploads + frame(_run(_opjson(name, args), keys, sig=name)))
    from_file_kw = {"dict": {"dtype": {"dtype": "uint8"}, "device": {"device": "cpu"}}}
    add("op.name", "aten.from_file.default with canary and kwargs",
        frame(_run(_opjson("aten.from_file.default", [canary, False, 16], from_file_kw), [], sig="ff")))
    for name, args, kw in RESOURCE_OPS:
        add("op.resource", f"{name} {_short(args, 40)}", frame(_run(_opjson(name, args, {"dict": kw}), [],
                                                                     sig=f"{name}{args}")))
    tensor_arg = addmm.run["op"]["args"][0]
    for enc in [{"tensor": {"dtype": "_dynamo", "shape": [8], "stride": [1]}}, {"tensor": "x"}, {"dtype": "_dynamo"},
                {"dtype": "__class__"}, {"device": "cuda:99"}, {"device": "meta"}, {"device": "cpu:999999999999"},
                {"device": "x" * 1000}, {"memory_format": "x"}, {"memory_format": ["a"]}, {"layout": 5},
                {"complex": [1, 2, 3]}, {"complex": "x"}, {"float": "1e999"}, {"float": "nan"}, {"tuple": 5},
                {"dict": {"a": tensor_arg}}, {"a": 1, "b": 2}, {}, deep(40), deep(500), {"opaque": "x"},
                *({"tensor": dict(tensor_arg["tensor"], **change)}
                  for change in ({"shape": [2**62]}, {"offset": -1}, {"exact": "yes"}, {"key": 5},
                                 {"stride": [2**62]}, {"dtype": "float64"}))]:
        op = dict(addmm.run["op"], args=[enc] + addmm.run["op"]["args"][1:])
        add("op.args", f"args[0]={_short(enc, 60)}", addmm.uploads + frame(dict(addmm.run, op=op, sig="enc")))
        op = dict(addmm.run["op"], kwargs={"dict": {"beta": enc}})
        add("op.kwargs", f"kwargs beta={_short(enc, 60)}", addmm.uploads + frame(dict(addmm.run, op=op, sig="kw")))
    # binary call frames (handle 0 is the session's first planned op: a probe's gelu, once one ran)
    k1, k2 = bytes(range(16)), bytes(16)
    inline = [(1, k1, bytes(64))]
    for h in (0, 1, 7, 2**31, 2**32 - 1):
        add("call.handle", f"handle {h}", call_frame(h, inline))
    for index, call in ((-2, 0), (-2**63, 0), (2**63 - 1, 0), (0, -1), (0, 2**63 - 1)):
        add("call.place", f"index {index} call {call}", call_frame(0, inline, index=index, call=call))
    for module in (b"\xff\xfe", "é/ü".encode(), b"A" * 65535, b"\0" * 300):
        add("call.module", f"module {_short(module, 30)}", call_frame(0, inline, module=module))
    for count in (0, 2, 4096, 65535):
        add("call.count", f"{count} inputs declared, 1 sent", call_frame(0, inline, count=count))
    for kind in (3, 7, 255):
        add("call.kind", f"input kind {kind}", call_frame(0, [(kind, k1, b"")]))
    for offset, rank, strides in ((0, 1, (1,)), (2**40, 1, (1,)), (0, 1, (-5,)), (0, 3, (1, 1, 1)), (0, 200, ()),
                                  (0, 2, (1,))):  # the last declares two strides and sends one
        add("call.view", f"view +{offset} rank {rank}", call_frame(0, [], count=1) + _INPUT.pack(2, k1, offset)
            + bytes([rank]) + struct.pack(f"<{len(strides)}q", *strides))
    add("call.entry", "held input with a size", call_frame(0, [], count=1) + _INPUT.pack(0, k1, 64))
    add("call.entry", "held input never uploaded", call_frame(0, [(0, k2, b"")]))
    add("call.entry", "inline 2^40 bytes, none sent", call_frame(0, [], count=1) + _INPUT.pack(1, k1, 1 << 40))
    add("call.entry", "over-cap inline input, sent", call_frame(0, [(1, k1, bytes(MAX_PAYLOAD + 8))]))
    add("call.entry", "inline of an odd size", call_frame(0, [(1, k1, bytes(7))]))
    add("call.entry", "64 inputs, mixed", call_frame(0, [(i % 2, bytes([i]) * 16, bytes(4 * i)) for i in range(64)]))
    for count, body in ((1, k2), (3, k1 * 3), (0, b""), (5000, bytes(16 * 5000)), (65535, bytes(16 * 65535)),
                        (2, k1)):  # the last declares two names and sends one: the frame is incomplete
        add("call.names", f"{count} output names", call_frame(0, inline, names=struct.pack("<H", count) + body))
    add("call.names", "a named call whose held input was never uploaded", call_frame(0, [(0, k1, b"")], names=b"\0\0"))
    # random byte mutations of valid frames fill the rest
    n_mut = max(n - len(fixed), n // 3)
    chosen = fixed if len(fixed) <= n - n_mut else rng.sample(fixed, n - n_mut)
    seeds = [ops[0].raw(), ops[1].raw(), frame(base_t, bytes(64)), frame(addmm.run), make_probe(0).raw,
             call_frame(0, inline), call_frame(1, [(0, k2, b""), (1, k1, bytes(32))], module=b"encoder.layer.0")]
    muts: list[Gen] = []
    for _ in range(n_mut):
        raw = bytearray(rng.choice(seeds))
        how = rng.choice(["flip", "flip", "set", "insert", "delete", "truncate", "dup", "length"])
        for _ in range(rng.randint(1, 8) if how in ("flip", "set") else 1):
            i = rng.randrange(len(raw))
            if how == "flip":
                raw[i] ^= 1 << rng.randrange(8)
            elif how == "set":
                raw[i] = rng.choice(b'\x00\xff"{}[],:-9e\\')
            elif how == "insert":
                raw[i:i] = rng.randbytes(rng.randint(1, 16))
            elif how == "delete":
                del raw[i:i + rng.randint(1, 16)]
            elif how == "truncate":
                del raw[i:]
            elif how == "dup":
                j = rng.randrange(i, len(raw) + 1)
                raw[j:j] = raw[i:j]
            else:
                raw[0:4] = _LEN.pack(max(0, _LEN.unpack(raw[0:4])[0] + rng.randint(-8, 8)))
        muts.append(("mutation", f"{how} of a valid frame", bytes(raw)))
    return chosen + muts


def _traceback_blocks(text: str) -> Iterator[tuple[str, str]]:
    """``(where, error)`` per traceback: the innermost frame and the exception line."""
    for block in text.split(TB)[1:]:
        where, error = "?", "?"
        lines = block.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r'\s+File "([^"]+)", line (\d+), in (\S+)', line)
            if m:
                path = Path(m[1])
                where = f"{path.parent.name}/{path.name}:{m[2]} in {m[3]}"
                error = next((ln for ln in lines[i + 1:] if ln and not ln.startswith(" ")), error)
            elif line.startswith(("Exception in thread", "During handling")):
                break
        yield where, error


def _normalize(s: str) -> str:
    s = re.sub(r"/[\w./-]+", "<path>", s)
    s = re.sub(r"0x[0-9a-f]+|\b[0-9a-f]{16,}\b", "<hex>", s)
    return re.sub(r"\d+", "N", s)[:200]


@dataclass
class WorkerFindings:
    outcomes: Counter = field(default_factory=Counter)
    by_family: dict = field(default_factory=dict)
    tracebacks: dict = field(default_factory=dict)  # (where, error) -> {"count", "example"}
    notes: dict = field(default_factory=dict)  # class -> {"count", "example"}
    valid: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    deaths: list = field(default_factory=list)
    control: Counter = field(default_factory=Counter)

    def note(self, cls: str, example: str) -> None:
        entry = self.notes.setdefault(cls, {"count": 0, "example": example})
        entry["count"] += 1


def _spawn(platform: str, token: str):
    from tapml.remote import spawn_worker

    w = spawn_worker(platform, token=token, max_payload=MAX_PAYLOAD)
    resource.prlimit(w.proc.pid, resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a runaway allocation fails, not OOMs
    return w


def _stop(w: Any, root: Path, logs: list[str]) -> None:
    """Stop a worker, keeping its stderr log (``stop`` deletes it)."""
    dest = root / f"worker-{len(logs)}.log"
    try:
        shutil.copy(w.log, dest)
        logs.append(str(dest))
    except OSError:
        pass
    w.stop()


def fuzz_worker(args: argparse.Namespace, root: Path, store_dir: Path, canary: Path) -> tuple[dict, WorkerFindings]:
    rng = random.Random(args.seed)
    ops = valid_ops(store_dir)
    frames = gen_frames(rng, args.frames, ops, str(canary))
    f = WorkerFindings()
    logs: list[str] = []
    token = "fuzz-token"
    w = _spawn("torch-cpu", token)
    canary_text = canary.read_bytes()
    os.utime(canary, ns=OLD_TIMES)  # atime < mtime: the next read of it bumps atime under relatime
    canary_stat = canary.stat()

    tbs: dict[str, Any] = {"pos": 0, "buf": b"", "labels": []}

    def attribute(label: str, wait: float) -> None:
        """Credit tracebacks that appeared in the log since the last frame to ``label``."""
        deadline = time.monotonic() + wait
        while True:
            try:
                with open(w.log, "rb") as fh:
                    fh.seek(tbs["pos"])
                    chunk = fh.read()
            except OSError:
                chunk = b""
            tbs["pos"] += len(chunk)
            tbs["buf"] += chunk
            new = tbs["buf"].count(TB.encode()) - len(tbs["labels"])
            if new > 0 or time.monotonic() >= deadline:  # a dying thread prints after it closes the socket
                break
            time.sleep(0.002)
        tbs["labels"] += [label] * max(new, 0)

    def classify(log: str) -> None:
        text = Path(log).read_text(errors="replace")
        labels = tbs["labels"] + ["(unattributed)"] * text.count(TB)
        for (where, error), label in zip(_traceback_blocks(text), labels, strict=False):
            entry = f.tracebacks.setdefault(f"{where} | {_normalize(error)}",
                                            {"count": 0, "error": error, "example": label})
            entry["count"] += 1
        tbs.update(pos=0, buf=b"", labels=[])

    # slow-loris probes, checked at the end: a silent socket on each port, and a half-sent frame
    slow: dict[str, socket.socket] = {}
    s0 = Session(w.host, w.port, token)
    slow["control socket, no preamble"] = socket.create_connection((w.host, w.port), timeout=5)
    slow["data socket, no preamble"] = socket.create_connection((w.host, s0.info["data_port"]), timeout=5)
    s0.data.sendall(_LEN.pack(100) + b"{}")
    slow["data socket, half-sent frame"] = s0.data
    garbage = socket.create_connection((w.host, w.port), timeout=5)
    garbage.sendall(f"TAPML1 {token}\n".encode() + b"\xff" * 64)
    slow["control socket, valid preamble then 64 garbage bytes"] = garbage
    t_slow = time.monotonic()

    sess: Session | None = None
    started = time.monotonic()
    for i, (family, label, raw) in enumerate(frames):
        if time.monotonic() - started > args.worker_budget:
            f.note("worker phase stopped at its time budget", f"after {i} frames")
            break
        if i % 25 == 0:  # a valid op on the current session and on a fresh one
            for where in ("session", "fresh"):
                try:
                    s = Session(w.host, w.port, token) if where == "fresh" or sess is None else sess
                    result = check_valid(s.data, ops[i // 25 % 2])
                except (OSError, EOFError, ValueError) as e:
                    result = f"connect failed: {type(e).__name__}"
                    s = None
                f.valid[f"{where}: {result}"] += 1
                if result != "ok":
                    f.note(f"valid op on {where} session: {result}", f"before frame {i} ({label})")
                if where == "fresh" and s is not None:
                    s.close()
        if sess is None:
            try:
                sess = Session(w.host, w.port, token)
            except (OSError, EOFError, ValueError) as e:
                f.note("cannot open a session", f"{type(e).__name__}: {e} before frame {i}")
                if not w.alive():
                    f.deaths.append(f"before frame {i} ({label})")
                    _stop(w, root, logs)
                    classify(logs[-1])
                    w = _spawn("torch-cpu", token)
                continue
        expect, _ = simulate(raw, MAX_PAYLOAD)
        timeout = 0.3 if expect == "incomplete" else 5.0
        outcome, own, verdict, outs = exchange(sess.data, raw, make_probe(i), timeout)
        for r in own:
            f.errors[f"{r.get('error', 'ok')}: {_normalize(str(r.get('message', '')))[:70]}"] += 1
        if outcome == "answered":
            if verdict != "ok":
                f.note(f"probe after a malformed frame: {verdict[:60]}", f"{family}: {label}")
            if not own:
                outcome = "accepted (no reply)"
            elif all(r.get("ok") for r in own):
                outcome = "ok reply"
                if family in RAN_IS_FINDING:
                    f.note(f"op ran for a client: {label}", _short(raw[-300:], 300))
            else:
                outcome = "error reply"
        elif outcome == "no-answer":
            outcome = "waiting on incomplete frame" if expect == "incomplete" else "hang"
            if outcome == "hang":
                f.note(f"no answer within {timeout:.0f}s to a complete frame ({family})", f"{label}: "
                       f"{_short(raw, 300)}")
        elif own:
            outcome = "error reply, then closed"
        if canary_text[:16] in outs:
            f.note("canary content returned by the worker", label)
        f.outcomes[outcome] += 1
        f.by_family.setdefault(family, Counter())[outcome] += 1
        if outcome not in ("ok reply", "error reply", "accepted (no reply)"):
            sess.close()
            sess = None
        attribute(f"{family}: {label}: {_short(raw, 200)}", 0.05 if outcome == "closed" else 0.0)
        if not w.alive():
            f.deaths.append(f"frame {i} ({family}: {label}) rc={w.proc.returncode}")
            attribute(label, 0.0)
            _stop(w, root, logs)
            classify(logs[-1])
            w = _spawn("torch-cpu", token)
            sess = None
    if sess is not None:
        sess.close()
    control_fuzz(w, token, f, canary)
    while time.monotonic() - t_slow < 12:  # the preamble timeout is 10 s
        time.sleep(0.1)
    for name, sock in slow.items():
        sock.settimeout(0.5)
        try:
            state = "closed by worker" if sock.recv(1) == b"" else "got data"
        except TimeoutError:
            state = f"still open after {time.monotonic() - t_slow:.0f}s"
        except OSError:
            state = "closed by worker"
        f.notes.setdefault(f"slow-loris: {name}: {state}", {"count": 1, "example": ""})
        sock.close()
    s0.close()
    # final health: a fresh session answers both valid ops right, the process is alive
    serving = []
    for op in ops:
        try:
            s = Session(w.host, w.port, token)
            serving.append(check_valid(s.data, op))
            s.close()
        except (OSError, EOFError, ValueError) as e:
            serving.append(f"{type(e).__name__}: {e}")
    attribute("(end)", 0.2)
    alive = w.alive()
    _stop(w, root, logs)
    classify(logs[-1])
    log_text = Path(logs[-1]).read_text(errors="replace")
    touched = canary.stat().st_atime_ns != canary_stat.st_atime_ns
    summary = {
        "frames_sent": sum(f.outcomes.values()),
        "still_serving": all(r == "ok" for r in serving) and alive,
        "final_valid_ops": serving,
        "process_alive": alive,
        "worker_deaths": f.deaths,
        "tracebacks_in_last_log": log_text.count(TB),
        "tracebacks_total_all_workers": sum(e["count"] for e in f.tracebacks.values()),
        "outcomes": dict(f.outcomes),
        "by_family": {k: dict(v) for k, v in sorted(f.by_family.items())},
        "valid_checks": dict(f.valid),
        "error_replies": dict(f.errors.most_common()),
        "control": dict(f.control),
        "traceback_classes": f.tracebacks,
        "notes": f.notes,
        "canary_read": touched,
        "logs": logs,
    }
    return summary, f


def control_fuzz(w: Any, token: str, f: WorkerFindings, canary: Path) -> None:
    """Preambles on both ports, garbage on an authenticated rpyc stream, and control calls."""
    s = Session(w.host, w.port, token)
    data_port = s.info["data_port"]

    def preamble(port: int, raw: bytes, label: str) -> None:
        try:
            sock = socket.create_connection((w.host, port), timeout=5)
            sock.sendall(raw)
            sock.settimeout(3)
            try:
                state = "rejected (closed)" if sock.recv(1) == b"" else "answered"
            except TimeoutError:
                state = "held open"
            except OSError:
                state = "rejected (closed)"
            sock.close()
        except OSError as e:
            state = f"connect failed: {e}"
        f.control[f"preamble: {state}"] += 1
        if state != "rejected (closed)":
            f.note(f"preamble not rejected: {state}", label)

    bad = [b"TAPML1 wrong\n", b"TAPML1 \n", f"TAPML1 {token} \n".encode(), f"tapml1 {token}\n".encode(),
           f"TAPMLDATA {token}\n".encode(), b"\xff" * 100 + b"\n", f"TAPML1 {token * 2}\n".encode(), b"\n",
           b"\x00" * 8 + b"\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n",
           b"A" * 600, f"TAPML1 {token[:-1]}\n".encode(), f"TAPML1\t{token}\n".encode(), f"TAPML1  {token}\n".encode()]
    for raw in bad:
        preamble(w.port, raw, f"control port: {raw[:40]!r}")
    for raw in [b"TAPMLDATA wrong\n", b"TAPMLDATA\n", f"TAPMLDATA {token}\n".encode(), f"TAPML1 {token}\n".encode(),
                b"\xff" * 100 + b"\n", b"A" * 600, f"TAPMLDATA {s.info['nonce']}x\n".encode(),
                f"TAPMLDATA  {s.info['nonce']}\n".encode(), f"tapmldata {s.info['nonce']}\n".encode()]:
        preamble(data_port, raw, f"data port: {raw[:40]!r}")
    # garbage after a valid control preamble
    rng = random.Random(1)
    for k in range(10):
        preamble(w.port, f"TAPML1 {token}\n".encode() + rng.randbytes(64 << k % 5), f"rpyc garbage #{k}")
    # a second data socket presenting a live session's nonce
    other = socket.create_connection((w.host, data_port), timeout=5)
    other.sendall(f"TAPMLDATA {s.info['nonce']}\n".encode())
    time.sleep(0.2)  # bounded: let the worker attach it (nothing to poll on)
    outcome, _, _, _ = exchange(s.data, b"", make_probe(0), 2.0)
    stolen, _, _, _ = exchange(other, b"", make_probe(1), 1.0)
    f.control[f"duplicate nonce: first socket {outcome}, second socket {stolen}"] += 1
    if outcome != "answered":
        f.note("a second data socket with a live nonce takes over the session's replies",
               f"probe on the first socket: {outcome}; on the second: {stolen}")
    other.close()
    s.close()
    # control calls
    s = Session(w.host, w.port, token)
    from_file = json.dumps(_opjson("aten.from_file.default", [str(canary), False, 16]))
    op_texts: list[Any] = ["", "{", "null", "[]", "5", '"x"', '{"op":5}', from_file, "[" * 100000 + "]" * 100000,
                           json.dumps(_opjson("aten._print.default", ["TAPMLFUZZ"])),
                           json.dumps(_opjson("load_library.__call__.__call__", [str(canary)])),
                           json.dumps(_opjson("aten.empty.memory_format", [[64]])), 5, None, b"bytes", ("t",),
                           "x" * (1 << 20)]
    for text in op_texts:
        try:
            reply = json.loads(s.conn.root.prepare(text))
            state = "refused" if not reply.get("ok") else "prepared"
            if reply.get("ok") and text not in (op_texts[11],):
                f.note("control prepare accepted a malformed/unsafe op", _short(text, 120))
        except Exception as e:
            state = f"raised {type(e).__name__}"
        f.control[f"prepare: {state}"] += 1
    from rpyc.core.netref import BaseNetref

    for attr in ["_session", "__dict__", "on_connect", "exposed_stats", "_rpyc_getattr", "hello.__globals__",
                 "prepare.__func__", "hello.__self__", "stats.__code__", "hello.__func__", "_conn", "_protocol",
                 "exposed_prepare.__globals__", "hello.__call__.__self__.__func__", "hello.__call__.__self__.__self__",
                 "hello.__call__.__self__.__globals__"]:
        try:
            obj = s.conn.root
            for part in attr.split("."):
                obj = getattr(obj, part)
            state = "reachable (a remote object)" if isinstance(obj, BaseNetref) else "a plain value"
            if attr != "exposed_stats" and isinstance(obj, BaseNetref):
                f.note(f"control attribute {state}: root.{attr}", _short(repr(obj), 100))
        except Exception as e:
            state = f"refused ({type(e).__name__})"
        f.control[f"attr: {state}"] += 1
    for call in [lambda: s.conn.root.hello("extra"), lambda: s.conn.root.stats(1), lambda: s.conn.root.prepare()]:
        try:
            call()
            state = "returned"
        except Exception as e:
            state = f"raised {type(e).__name__}"
        f.control[f"bad arity: {state}"] += 1
    s.close()


# -- part 2: stores --------------------------------------------------------------------------------
def runner_main() -> None:
    """Hidden ``--_runner`` mode: import tapml once, then fork one CLI run per request line."""
    os.environ.pop("TAPML_DEBUG", None)
    os.environ.update(NO_COLOR="1", COLUMNS="160", TERM="dumb")
    from tapml import cli

    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                os.setpgid(0, 0)
                resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))  # a store cannot OOM the machine
                for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, req["out"] + ".out", os.O_WRONLY),
                                        (2, req["out"] + ".err", os.O_WRONLY)):
                    os.dup2(os.open(name, flags | (os.O_CREAT | os.O_TRUNC if fd else 0), 0o644), fd)
                rc = cli.main(req["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                rc = 1
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
                os._exit(rc)
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        timed_out = not poller.poll(req["timeout"] * 1000)
        if timed_out:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        os.close(pidfd)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timeout": timed_out,
                          "wall": time.monotonic() - start}), flush=True)


class Runner:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--_runner"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        if self._line(120) != "ready":
            raise RuntimeError("the fork runner did not start")

    def _line(self, timeout: float) -> str | None:
        poller = select.poll()
        poller.register(self.proc.stdout, select.POLLIN)
        return self.proc.stdout.readline().strip() if poller.poll(timeout * 1000) else None

    def run(self, argv: list[str], out: str, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps({"argv": argv, "out": out, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self._line(timeout + 30)
        if not line:
            self.close()
            self.__init__()
            return {"rc": None, "timeout": True, "wall": timeout}
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def exec_run(argv: list[str], out: str, timeout: float) -> dict:
    """The real executable, for the cross-check."""
    tapml = Path(sys.executable).with_name("tapml")
    env = {k: v for k, v in os.environ.items() if k != "TAPML_DEBUG"} | {"NO_COLOR": "1", "COLUMNS": "160"}
    start = time.monotonic()
    with open(out + ".out", "wb") as o, open(out + ".err", "wb") as e:
        try:
            rc = subprocess.run([str(tapml), *argv], stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env,
                                timeout=timeout).returncode
            return {"rc": rc, "timeout": False, "wall": time.monotonic() - start}
        except subprocess.TimeoutExpired:
            return {"rc": None, "timeout": True, "wall": timeout}


@dataclass
class Case:
    index: int
    family: str
    what: str
    dir: Path
    tamper: str = ""  # tensor bytes that no longer match their key while the manifest stays valid
    tampered: tuple = ()  # the keys whose bytes changed
    canary: str = ""
    results: dict = field(default_factory=dict)

    @property
    def store(self) -> Path:
        return self.dir / "store"


SHARD = "shard-00000.safetensors"


def _paths(obj: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, path + (i,))


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _refs(body: dict) -> list[dict]:
    out = []
    for path in _paths(body):
        node = _get(body, path)
        if isinstance(node, dict) and "key" in node and "stride" in node:
            out.append(node)
    return out


def _weird(rng: random.Random, case: Case) -> Any:
    return rng.choice(WEIRD + [str(case.dir / "canary.txt"), "../canary.txt", "/etc/passwd", "../../canary.txt"])


# schema 2 (compact manifest): each op is a row of these columns; op, module, source, library are string indices
OP_COLUMNS = ("seq", "op", "module", "call", "layer", "step", "source", "signature", "args", "kwargs", "outputs",
              "flags", "library", "carved_index")
_STRING_COLUMNS = ("op", "module", "source", "library")


def _is_op(o: Any) -> bool:
    return isinstance(o, dict) or (isinstance(o, list) and len(o) >= 12)


def _op_label(body: dict, op: Any) -> Any:
    return op.get("index") if isinstance(op, dict) else (body["ops"].index(op) if op in body["ops"] else "?")


def _op_set(body: dict, op: Any, name: str, value: Any, rng: random.Random | None = None) -> None:
    """Set one field of an op record: a schema-1 dict, or a schema-2 row (a string goes into the string table,
    or — sometimes, with ``rng`` — stays raw or becomes an out-of-range index, as a hostile store would)."""
    if isinstance(op, dict):
        op[name] = value
        return
    if name in ("view", "nondeterministic", "inplace"):
        bit = {"view": 1, "inplace": 2, "nondeterministic": 4}[name]
        flags = op[11] if isinstance(op[11], int) and not isinstance(op[11], bool) else 0
        op[11] = (flags | bit) if value else (flags & ~bit)
        return
    col = OP_COLUMNS.index(name)
    while len(op) <= col:
        op.append(None)
    if name in _STRING_COLUMNS and isinstance(value, str):
        strings = body.get("strings")
        roll = rng.random() if rng is not None else 1.0
        if roll < 0.1 or not isinstance(strings, list):
            op[col] = value  # a raw string where an index belongs
            return
        if roll < 0.2:
            op[col] = rng.choice([len(strings), -1, 2**63, 1.0, True])  # an index off the table
            return
        if value not in strings:
            strings.append(value)
        op[col] = strings.index(value)
        return
    op[col] = value


def _op_refs(body: dict, op: Any) -> list[dict]:
    """The tensor uses an op reads and writes: inline refs (schema 1) or entries of ``uses`` (schema 2)."""
    if isinstance(op, dict):
        return _refs({"x": op})
    uses = body.get("uses") if isinstance(body.get("uses"), list) else []
    out = []
    for path in _paths(op[8:11]):
        node = _get(op[8:11], path)
        if isinstance(node, dict) and isinstance(node.get("tensor"), int) and 0 <= node["tensor"] < len(uses):
            use = uses[node["tensor"]]
            if isinstance(use, dict):
                out.append(use)
    return out


def mutate_manifest(rng: random.Random, body: dict, case: Case) -> str:
    """One JSON-aware mutation of ``body`` in place; returns what it did."""
    what = rng.choice(["leaf", "leaf", "delete", "insert", "op_name", "from_file", "tensor_ref", "tensor_ref",
                       "tensor_meta", "shard_name", "schema", "ops_type", "numbers", "ranges", "dtype", "kwargs",
                       "duplicate_op", "edges"])
    ops = body.get("ops") if isinstance(body.get("ops"), list) else []
    op = rng.choice(ops) if ops and all(_is_op(o) for o in ops) else None  # schema 1 dicts or schema 2 rows
    if what == "leaf":
        path = rng.choice(list(_paths(body))[1:])
        v = _weird(rng, case)
        _set(body, path, v)
        return f"{'.'.join(map(str, path))} = {_short(v, 60)}"
    if what == "delete":
        dicts = [p for p in _paths(body) if isinstance(_get(body, p), dict) and _get(body, p)]
        path = rng.choice(dicts)
        key = rng.choice(list(_get(body, path)))
        del _get(body, path)[key]
        return f"delete {'.'.join(map(str, path + (key,)))}"
    if what == "insert":
        dicts = [p for p in _paths(body) if isinstance(_get(body, p), dict)]
        path = rng.choice(dicts)
        key = rng.choice(["x", "__proto__", "digest", "schema", "", "offset", "exact", "tensor", "__class__"])
        v = _weird(rng, case)
        _get(body, path)[key] = v
        return f"insert {'.'.join(map(str, path + (key,)))} = {_short(v, 60)}"
    if what == "op_name" and op is not None:
        name = rng.choice(DANGEROUS_OPS + ["aten.empty.memory_format", "aten.addmm.default", "aten.gelu.default"])
        _op_set(body, op, "op", name, rng)
        return f"ops[{_op_label(body, op)}].op = {name!r}"
    if what == "from_file" and op is not None:
        name = rng.choice(["aten.from_file.default", "aten._print.default", "load_library.__call__.__call__"])
        fields = {"op": name, "args": [str(case.dir / "canary.txt"), False, 16] if "_print" not in name else
                  ["TAPMLCANARY"], "kwargs": {"dict": {"dtype": {"dtype": "uint8"}}}, "nondeterministic": False,
                  "view": False}
        for k, v in fields.items():
            _op_set(body, op, k, v)
        return f"ops[{_op_label(body, op)}] = {name}({case.dir / 'canary.txt'})"
    if what == "tensor_ref" and _refs(body):
        ref = rng.choice(_refs(body))
        fld = rng.choice(["key", "shape", "stride", "offset", "exact", "dtype"])
        keys = list(body["tensors"]) if isinstance(body.get("tensors"), dict) else ["x"]
        v = rng.choice([rng.choice(keys), "0" * 32, 5, None, [-1], [2**62, 2**62], [1.5], [0], [1] * 65, -1, 2**63,
                        "yes", "_dynamo", "float64", "int32", [16], [4, 4], [64, 0], [1, 2**24], [2**33, 1],
                        [2**62, 1], [10**30, 1], 2**40])
        ref[fld] = v
        return f"tensor ref .{fld} = {_short(v, 60)}"
    if what == "tensor_meta" and isinstance(body.get("tensors"), dict) and body["tensors"]:
        key = rng.choice(list(body["tensors"]))
        fld = rng.choice(["dtype", "numel", "nbytes", "shard", "offset", "offset"])
        meta = body["tensors"][key]
        v = rng.choice([-1, -64, -128, 2**63, 10**30, 0, 64, 416, 480, 1 << 40, None, "0", 1.5, "int32",
                        "_dynamo", "../" + SHARD, "/etc/passwd"])
        if isinstance(meta, dict):
            meta[fld] = v
        return f"tensors.{key[:8]}.{fld} = {_short(v, 40)}"
    if what == "shard_name" and isinstance(body.get("shards"), dict):
        name = rng.choice(["../" + SHARD, "../../canary.safetensors", str(case.dir / "canary.safetensors"),
                           "/etc/passwd", "", ".", "..", "tensors/../../x", "shard\x00", SHARD + "/", "x" * 5000,
                           "C:\\x", "~/x", ".hidden", "shard-99999.safetensors", SHARD.upper()])
        body["shards"] = {name if k == SHARD else k: v for k, v in body["shards"].items()}
        for meta in (body.get("tensors") or {}).values():
            if isinstance(meta, dict) and meta.get("shard") == SHARD:
                meta["shard"] = name
        return f"shard renamed to {_short(name, 60)}"
    if what == "schema":
        body["schema"] = rng.choice(["1", 5, -1, 0, True, 1.0, None, 2**64, [1]])
        return f"schema = {body['schema']!r}"
    if what == "ops_type":
        body["ops"] = rng.choice([5, None, {}, "x", [], [None], [5], deep(5000)])
        return f"ops = {_short(body['ops'], 40)}"
    if what == "numbers":
        ints = [p for p in _paths(body) if p and isinstance(_get(body, p), int) and not isinstance(_get(body, p), bool)]
        if ints:
            path = rng.choice(ints)
            v = rng.choice([-1, -2**63, 2**63, 2**64, 10**30, 1e308, float("nan"), float("inf")])
            _set(body, path, v)
            return f"{'.'.join(map(str, path))} = {v!r}"
    if what == "ranges":
        target = rng.choice(["steps", "layers", "layer", "step", "parent"])
        v = rng.choice([[0, 99], [3, 1], [-1, 2], [0], [0, 1, 2], 99, -1, 2**63])
        if target in ("steps", "layers") and body.get(target):
            item = rng.choice(body[target])
            if isinstance(item, dict):
                item["ops"] = v
        elif op is not None:
            _op_set(body, op, target if target != "parent" else "layer", v)
        return f"{target} range/index = {v!r}"
    if what == "dtype" and op is not None:
        refs = _op_refs(body, op)
        if refs:
            ref = rng.choice(refs)
            ref["dtype"] = rng.choice(["_dynamo", "float", "Tensor", "__class__", "qint8", "complex32", "bool",
                                       "int32", "float8_e5m2", "uint32", "qint32"])
            return f"ops[{_op_label(body, op)}] ref dtype = {ref['dtype']}"
    if what == "kwargs" and op is not None:
        kwargs = rng.choice([{"dict": {"device": {"device": "cuda:99"}}},
                                   {"dict": {"dtype": {"dtype": "_dynamo"}}},
                                   {"dict": {"memory_format": {"memory_format": "x"}}},
                                   {"dict": {"approximate": "tanh"}},
                                   {"dict": {"beta": {"float": "nan"}}}, {"dict": {"x": {"a": 1, "b": 2}}},
                                   {"dict": {"device": {"device": "meta"}}}, {"dict": {"a": deep(40)}},
                                   {"dict": {"approximate": 5}}, {"dict": {"m": {"memory_format": ["a"]}}},
                                   {"dict": {"m": {"layout": {}}}}, {"dict": {"m": {"device": ["cpu"]}}},
                                   {"dict": {"m": {"dtype": ["float32"]}}}, {"dict": {"m": {"complex": [1, "x"]}}}])
        _op_set(body, op, "kwargs", kwargs)
        return f"ops[{_op_label(body, op)}].kwargs = {_short(kwargs, 60)}"
    if what == "duplicate_op" and ops:
        ops.append(copy.deepcopy(rng.choice(ops)))
        return "an op duplicated at the end"
    if what == "edges":
        body["edges"] = rng.choice([[[0, 99]], [[-1]], "x", [[0, 1, 2]], [[2**63, 0]]])
        return f"edges = {body['edges']!r}"
    return mutate_manifest(rng, body, case)


def _reseal_size(case: Case, body: dict, size: int) -> None:
    body["shards"][SHARD]["bytes"] = size
    (case.store / "manifest.json").write_text(seal_text(dumps(body)))


def mutate_shard(rng: random.Random, body: dict, case: Case, layout: dict) -> str:
    """Damage the shard (or its manifest entry) the way a disk, a copy or an attacker could."""
    shard = case.store / "tensors" / SHARD
    data = bytearray(shard.read_bytes())
    start = layout["data_start"]
    kind = rng.choice(["data_flip", "data_flip", "data_flip", "header_flip", "truncate", "extend", "symlink_copy",
                       "symlink_text", "symlink_dir", "manifest_symlink", "shard_dir", "empty", "alias",
                       "negative_offset"])
    case.family = f"shard.{kind}"
    if kind == "data_flip":
        pos = rng.randrange(start, len(data))
        bit = rng.randrange(8)
        data[pos] ^= 1 << bit
        shard.write_bytes(data)
        key = next(k for k, (lo, hi) in layout["spans"].items() if lo <= pos - start < hi)
        case.tamper = f"byte {pos - start - layout['spans'][key][0]} bit {bit} of tensor {key[:8]}"
        case.tampered = (key,)
        return f"flipped {case.tamper}"
    if kind == "header_flip":
        pos = rng.randrange(0, start)
        data[pos] ^= 1 << rng.randrange(8)
        shard.write_bytes(data)
        return f"flipped a bit of safetensors header byte {pos}"
    if kind == "truncate":
        size = rng.randrange(0, len(data))
        shard.write_bytes(data[:size])
        _reseal_size(case, body, size)
        return f"truncated to {size} bytes, manifest resealed"
    if kind == "extend":
        shard.write_bytes(data + rng.randbytes(rng.randint(1, 64)))
        _reseal_size(case, body, shard.stat().st_size)
        return "garbage appended, manifest resealed"
    if kind == "symlink_copy":
        shard.unlink()
        shard.symlink_to(case.dir / "canary.safetensors")
        return "shard is a symlink to an identical file outside the store"
    if kind == "symlink_text":
        shard.unlink()
        shard.symlink_to(case.dir / "canary.txt")
        _reseal_size(case, body, (case.dir / "canary.txt").stat().st_size)
        return "shard is a symlink to canary.txt outside the store, size resealed"
    if kind == "symlink_dir":
        outside = case.dir / "outside-tensors"
        shutil.move(str(case.store / "tensors"), outside)
        (case.store / "tensors").symlink_to(outside)
        return "tensors/ is a symlink to a directory outside the store"
    if kind == "manifest_symlink":
        (case.store / "manifest.json").rename(case.dir / "outside-manifest.json")
        (case.store / "manifest.json").symlink_to(case.dir / "outside-manifest.json")
        return "manifest.json is a symlink to a file outside the store"
    if kind == "shard_dir":
        shard.unlink()
        shard.mkdir()
        return "shard is a directory"
    if kind == "empty":
        shard.write_bytes(b"")
        _reseal_size(case, body, 0)
        return "shard emptied, size resealed"
    tensors = body["tensors"]
    if kind == "alias":
        same = [(a, b) for a in tensors for b in tensors if a < b and tensors[a]["nbytes"] == tensors[b]["nbytes"]]
        a, b = rng.choice(same)
        tensors[a]["offset"], tensors[b]["offset"] = tensors[b]["offset"], tensors[a]["offset"]
        (case.store / "manifest.json").write_text(seal_text(dumps(body)))
        case.tamper = f"tensors {a[:8]} and {b[:8]} swap offsets (same size)"
        case.tampered = (a, b)
        return f"manifest resealed with {case.tamper}"
    blob = sum(m["nbytes"] for m in tensors.values())
    key = rng.choice([k for k in tensors if tensors[k]["offset"] > 0])
    # a negative offset slices from the blob's end; skip the one that lands on the tensor's own bytes
    tensors[key]["offset"] = -rng.choice([o for o in (64, 128, 256, 480) if blob - o != tensors[key]["offset"]])
    (case.store / "manifest.json").write_text(seal_text(dumps(body)))
    case.tamper = f"tensor {key[:8]} offset = {tensors[key]['offset']} (negative), resealed"
    case.tampered = (key,)
    return case.tamper


def build_case(rng: random.Random, index: int, root: Path, base: Path, base_body: dict, layout: dict) -> Case:
    case = Case(index, "manifest", "", root / f"case-{index:05d}")
    case.dir.mkdir(parents=True)
    shutil.copytree(base, case.store)
    token = f"TAPMLCANARY-{index}-{rng.getrandbits(64):016x}\n"
    (case.dir / "canary.txt").write_text(token * 4)
    case.canary = token.strip()
    shutil.copy(base / "tensors" / SHARD, case.dir / "canary.safetensors")
    body = copy.deepcopy(base_body)
    if rng.random() < 0.2:
        case.what = mutate_shard(rng, body, case, layout)
    else:
        whats = [mutate_manifest(rng, body, case) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        try:
            text = dumps(body)
        except (ValueError, RecursionError) as e:
            text = dumps(base_body)
            whats.append(f"(unserializable: {e})")
        roll = rng.random()
        raw = bytearray(text.encode())
        if roll < 0.08:  # raw byte flips in the body, resealed
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw) - 1)] ^= 1 << rng.randrange(8)
            whats.append("raw byte flips, resealed")
        sealed = seal_bytes(bytes(raw)) if roll > 0.03 else bytes(raw[:-1]) + b',"digest":"' + b"0" * 64 + b'"}'
        if roll <= 0.03:
            whats.append("NOT resealed")
        (case.store / "manifest.json").write_bytes(sealed)
        case.family = "manifest." + whats[0].split(" ")[0].split(".")[0][:24]
        case.what = "; ".join(whats)
    for name in ("canary.txt", "canary.safetensors"):  # atime < mtime: any read bumps atime under relatime
        os.utime(case.dir / name, ns=OLD_TIMES)
    return case


def _outside_state(case: Case) -> dict:
    state = {}
    for p in sorted(case.dir.rglob("*")):
        if case.store in p.parents or p == case.store or p.suffix in (".out", ".err"):
            continue
        try:
            st = p.lstat()
        except OSError:
            continue
        state[str(p.relative_to(case.dir))] = (st.st_atime_ns, st.st_mtime_ns, st.st_size)
    return state


def run_case(case: Case, run: Callable[[list[str], str, float], dict]) -> None:
    before = _outside_state(case)
    for cmd, argv, timeout in (("inspect", ["inspect", str(case.store)], 60.0),
                               ("replay", ["replay", str(case.store), "--platform", "torch-cpu", "--json"], 120.0)):
        out = str(case.dir / cmd)
        res = run(argv, out, timeout)
        text_out = Path(out + ".out").read_text(errors="replace") if Path(out + ".out").exists() else ""
        text_err = Path(out + ".err").read_text(errors="replace") if Path(out + ".err").exists() else ""
        res["traceback"] = TB in text_out or TB in text_err
        lines = text_err.strip().splitlines() or [""]
        res["last"] = next((ln for ln in reversed(lines) if ln.startswith("tapml:")), lines[-1])[:400]
        res["canary_in_output"] = case.canary in text_out or case.canary in text_err
        if cmd == "replay" and res["rc"] == 0:
            try:
                res["counts"] = json.loads(text_out).get("counts", {})
            except ValueError:
                res["counts"] = {"unparsable": 1}
        case.results[cmd] = res
    after = _outside_state(case)
    outside_reads = {"canary.txt", "canary.safetensors", "outside-tensors/" + SHARD, "outside-manifest.json"}
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    case.results["touched_outside"] = [k for k in changed if k in outside_reads or k not in before]
    case.results["modified_outside"] = [k for k in changed if k not in before or before[k][1:] != after.get(k, ())[1:]]
    (case.dir / "case.json").write_text(json.dumps({"family": case.family, "what": case.what, "tamper": case.tamper,
                                                    **case.results}, indent=1))


def fuzz_stores(args: argparse.Namespace, root: Path, base: Path) -> tuple[dict, list[Case]]:
    from tapml.carving import FixtureStore  # the records in one shape, whatever the manifest's schema
    from tapml.core import iter_specs

    rng = random.Random(args.seed + 1)
    text = (base / "manifest.json").read_text()
    base_body = json.loads(text)
    del base_body["digest"]
    assert seal_text(dumps(base_body)) == text, "the resealer does not reproduce carving/store.py:_seal"
    raw = (base / "tensors" / SHARD).read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    packed = json.loads(raw[8:start])["__packed__"]["data_offsets"]
    layout = {"data_start": start + packed[0],
              "spans": {k: (m["offset"], m["offset"] + m["nbytes"]) for k, m in base_body["tensors"].items()}}
    cases = [build_case(rng, i, root / "cases", base, base_body, layout) for i in range(args.manifests)]
    runners: queue.Queue = queue.Queue()
    for _ in range(args.jobs):
        runners.put(Runner())
    started = time.monotonic()

    def work(case: Case) -> None:
        if time.monotonic() - started > args.store_budget:
            return
        r = runners.get()
        try:
            run_case(case, r.run)
        finally:
            runners.put(r)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(work, cases))
    while not runners.empty():
        runners.get().close()
    done = [c for c in cases if c.results]
    print(f"fuzz: {len(done)} store cases in {time.monotonic() - started:.0f}s", file=sys.stderr)
    # cross-check a sample against the real executable: every odd case first, then random ones
    odd = [c for c in done if _odd(c)]
    sample = (odd[: args.exec_sample // 2] + random.Random(args.seed).sample(done, min(len(done), args.exec_sample)))
    sample = list({c.index: c for c in sample}.values())[: args.exec_sample]
    agree = 0
    for c in sample:
        same = True
        for cmd, argv in (("inspect", ["inspect", str(c.store)]),
                          ("replay", ["replay", str(c.store), "--platform", "torch-cpu", "--json"])):
            res = exec_run(argv, str(c.dir / f"exec-{cmd}"), 120.0)
            same &= res["rc"] == c.results[cmd]["rc"]
        agree += same
    replayed = {ref["key"] for rec in FixtureStore(base).ops if not rec["nondeterministic"] and not rec["view"]
                for part in ("args", "kwargs", "outputs") for ref in iter_specs(rec[part])}
    return summarize_stores(done, len(cases), agree, len(sample), replayed), done


def _odd(c: Case) -> bool:
    return any(r.get("rc") not in (0, 1, 2) or r.get("traceback") or r.get("timeout") or r.get("canary_in_output")
               for r in (c.results.get("inspect", {}), c.results.get("replay", {}))) \
        or bool(c.results.get("touched_outside")) or bool(c.results.get("modified_outside"))


def summarize_stores(done: list[Case], planned: int, agree: int, sampled: int, replayed: set[str]) -> dict:
    rcs: Counter = Counter()
    classes: dict[str, dict] = {}
    tamper: Counter = Counter()
    walls: dict[tuple, list] = {}
    for c in done:
        for cmd in ("inspect", "replay"):
            r = c.results[cmd]
            walls.setdefault((cmd, r["rc"]), []).append(r["wall"])
            rcs[f"{cmd} {'timeout' if r['timeout'] else r['rc']}"] += 1
            bad = r["timeout"] or r["rc"] not in (0, 1, 2) or r["traceback"]
            if bad:
                flags = (" timeout" if r["timeout"] else "") + (" traceback" if r["traceback"] else "")
                key = f"{cmd} rc={r['rc']}{flags} | {_normalize(r['last'])}"
                entry = classes.setdefault(key, {"count": 0, "example": str(c.store), "what": c.what,
                                                 "last": r["last"]})
                entry["count"] += 1
        if c.results["touched_outside"] or c.results["modified_outside"] or \
                any(c.results[k]["canary_in_output"] for k in ("inspect", "replay")):
            key = f"outside the store: {c.family}"
            entry = classes.setdefault(key, {"count": 0, "example": str(c.store), "what": c.what,
                                             "last": f"touched {c.results['touched_outside']}, modified "
                                                     f"{c.results['modified_outside']}, inspect rc "
                                                     f"{c.results['inspect']['rc']}, replay rc "
                                                     f"{c.results['replay']['rc']}"})
            entry["count"] += 1
        if c.tamper and not set(c.tampered) & replayed:
            tamper[f"in a tensor replay does not read ({c.family}): replay rc {c.results['replay']['rc']}, "
                   f"inspect rc {c.results['inspect']['rc']}"] += 1
        elif c.tamper:
            tamper["cases"] += 1
            tamper[f"inspect rc {c.results['inspect']['rc']}"] += 1
            rep = c.results["replay"]
            if rep["rc"] == 0:
                tamper["replay exit 0"] += 1
                counts = rep.get("counts", {})
                silent = not any(k in counts for k in ("divergent", "crashed", "failed", "unparsable"))
                tamper["replay exit 0, every compared op ok" if silent else "replay exit 0, some op divergent"] += 1
                if silent:
                    key = f"tampered tensor bytes replayed exit 0, all ok: {c.family}"
                    entry = classes.setdefault(key, {"count": 0, "example": str(c.store), "what": c.what,
                                                     "last": json.dumps(counts)})
                    entry["count"] += 1
    return {
        "cases": len(done), "planned": planned, "cli_runs": 2 * len(done),
        "exit_codes": dict(sorted(rcs.items())),
        "bad_exit_codes": sum(n for k, n in rcs.items() if k.split()[1] not in ("0", "1", "2")),
        "tracebacks": sum(c.results[k]["traceback"] for c in done for k in ("inspect", "replay")),
        "timeouts": sum(c.results[k]["timeout"] for c in done for k in ("inspect", "replay")),
        "touched_outside": sum(bool(c.results["touched_outside"]) for c in done),
        "modified_outside": sum(bool(c.results["modified_outside"]) for c in done),
        "canary_in_output": sum(c.results[k]["canary_in_output"] for c in done for k in ("inspect", "replay")),
        "families": dict(Counter(c.family for c in done).most_common()),
        "mean_wall_s": {f"{cmd} rc {rc}": round(sum(w) / len(w), 3) for (cmd, rc), w in sorted(walls.items())},
        "tamper": dict(tamper),
        "classes": classes,
        "exec_crosscheck": f"{agree}/{sampled} cases give the same exit codes from the real tapml executable",
    }


# -- driver ------------------------------------------------------------------------------------------
def atime_works(root: Path) -> bool:
    p = root / "atime-probe"
    p.write_text("x")
    os.utime(p, ns=OLD_TIMES)
    p.read_text()
    return p.stat().st_atime_ns != OLD_TIMES[0]


EMPTY_WORKER: dict = {"outcomes": {}, "still_serving": False, "worker_deaths": [], "tracebacks_total_all_workers": 0,
                      "frames_sent": 0, "control": {}, "traceback_classes": {}, "notes": {}}


EMPTY_STORES: dict = {"cases": 0, "cli_runs": 0, "bad_exit_codes": 0, "tracebacks": 0, "touched_outside": 0,
                      "canary_in_output": 0, "tamper": {}, "timeouts": 0, "classes": {}, "exec_crosscheck": "-"}


def table(worker: dict, stores: dict) -> str:
    hangs = worker["outcomes"].get("hang", 0) + stores["timeouts"]
    rows = [
        ("worker still serving (valid ops right on a fresh session, process alive)",
         "yes" if worker["still_serving"] else "no"),
        ("worker deaths during the run", len(worker["worker_deaths"])),
        ("tracebacks in the worker's stderr log", worker["tracebacks_total_all_workers"]),
        ("data frames sent", worker["frames_sent"]),
        ("... error reply / ok reply / accepted without a reply",
         f"{worker['outcomes'].get('error reply', 0)} / {worker['outcomes'].get('ok reply', 0)} / "
         f"{worker['outcomes'].get('accepted (no reply)', 0)}"),
        ("... closed connection", worker["outcomes"].get("closed", 0)),
        ("... no answer: waiting on an incomplete frame (by design)",
         worker["outcomes"].get("waiting on incomplete frame", 0)),
        ("... no answer to a complete frame (hang)", worker["outcomes"].get("hang", 0)),
        ("control-channel probes", sum(worker["control"].values())),
        ("store cases (CLI runs)", f"{stores['cases']} ({stores['cli_runs']})"),
        ("CLI exit codes other than 0/1/2", stores["bad_exit_codes"]),
        ("CLI runs that printed a traceback", stores["tracebacks"]),
        ("store cases that touched files outside the store", stores["touched_outside"]),
        ("canary content in CLI output", stores["canary_in_output"]),
        ("tensor bytes replay reads, tampered: replay exit 0 (all ops ok)",
         f"{stores['tamper'].get('replay exit 0', 0)} of {stores['tamper'].get('cases', 0)} "
         f"({stores['tamper'].get('replay exit 0, every compared op ok', 0)})"),
        ("hangs (worker + CLI timeouts)", hangs),
    ]
    return "\n".join(["| figure | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=1000, help="malformed data-channel frames")
    ap.add_argument("--manifests", type=int, default=1000, help="mutated stores (manifests and shards)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--jobs", type=int, default=2 * (os.cpu_count() or 1), help="parallel CLI runs (they mostly wait)")
    ap.add_argument("--exec-sample", type=int, default=10, help="cases rerun with the real tapml executable")
    ap.add_argument("--worker-budget", type=float, default=240.0, help="seconds for the worker phase")
    ap.add_argument("--store-budget", type=float, default=480.0, help="seconds for the store phase")
    ap.add_argument("--workdir", type=Path, help="default: a new directory under /tmp")
    ap.add_argument("--_runner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._runner:
        runner_main()
        return 0
    import torch

    from tapml.carving import carve

    t0 = time.monotonic()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="tapml-fuzz-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    base = root / "base-store"
    carve(model, lambda: model(torch.randn(2, 8)), base, force=True)
    canary = root / "worker-canary.txt"
    canary.write_text("TAPMLCANARY-worker\n" * 4)
    os.utime(canary, ns=OLD_TIMES)
    print(f"fuzz: workdir {root}; atime detects reads here: {atime_works(root)}", file=sys.stderr)
    worker, _ = fuzz_worker(args, root, base, canary) if args.frames else (EMPTY_WORKER, None)
    t1 = time.monotonic()
    print(f"fuzz: worker phase {t1 - t0:.0f}s", file=sys.stderr)
    stores, _ = fuzz_stores(args, root, base) if args.manifests else (EMPTY_STORES, None)
    t2 = time.monotonic()
    print(f"fuzz: store phase {t2 - t1:.0f}s", file=sys.stderr)
    figures = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "_runner"},
               "workdir": str(root), "wall_s": round(t2 - t0, 1), "atime_detects_reads": atime_works(root),
               "worker": worker, "stores": stores}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    print(table(worker, stores))
    print("\nworker traceback classes:")
    for k, v in sorted(worker["traceback_classes"].items(), key=lambda kv: -kv[1]["count"]):
        print(f"  {v['count']:5d} × {k}\n        e.g. {_short(v['example'], 220)}")
    print("worker notes:")
    for k, v in worker["notes"].items():
        print(f"  {v['count']:5d} × {k}" + (f"\n        e.g. {_short(v['example'], 220)}" if v["example"] else ""))
    print("store failure classes:")
    for k, v in sorted(stores["classes"].items(), key=lambda kv: -kv[1]["count"]):
        print(f"  {v['count']:5d} × {k}\n        e.g. {v['example']}: {_short(v['what'], 160)}\n"
              f"        {_short(v['last'], 300)}")
    print(f"{stores['exec_crosscheck']}; wall {t2 - t0:.0f}s; workdir {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

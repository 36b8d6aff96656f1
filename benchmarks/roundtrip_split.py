"""Where the µs of one tiny round trip go: client work, the wire and wake-ups, worker work.

``RemoteTarget.execute`` of ``aten.clone.default`` on a fresh 4-element float32 tensor (the tiny
side of ``transport.py``), against a worker started here whose data socket stamps the time each
``recv_into`` returns and each ``sendmsg`` begins; the client's socket does the same. Both
processes read ``CLOCK_MONOTONIC`` (``time.perf_counter_ns``), so the stamps line up:

    client pre | wire + wake-up | worker | wire + wake-up | client post

- client pre: ``execute`` called -> its ``sendmsg`` begins;
- wire + wake-up: a ``sendmsg`` begins -> the peer's ``recv_into`` returns (the kernel's TCP
  path, the sleeping peer's wake-up and its syscall);
- worker: its first ``recv_into`` of a call returns -> its answer's ``sendmsg`` begins;
- client post: the client's ``recv_into`` returns -> ``execute`` returns.

Medians of each column over ``--calls`` calls (the columns' medians need not add up to the total's).
Also ``--gap-us``: an idle sleep before each call (a busy machine's other work between calls).
``--floor``: the same round trip as a minimal Python program instead (the worker's thread receives a
fixed binary header and the bytes into a fresh tensor, clones it, hashes the clone with xxh3 and sends
header, key and bytes back in one ``sendmsg``; no plan, cache, checks or bookkeeping), and a 64-byte
ping-pong: what any Python implementation of this round trip pays on this machine.
Usage: python benchmarks/roundtrip_split.py [--calls 3000] [--gap-us 0] [--floor]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

import torch

WORKER = r'''
import json, os, sys, time
import tapml.remote.worker as w
stamps, ns = [], time.perf_counter_ns


class Stamped:
    def __init__(self, sock): self._sock = sock
    def __getattr__(self, name): return getattr(self._sock, name)
    def recv_into(self, *a):
        k = self._sock.recv_into(*a); stamps.append(("r", ns())); return k
    def sendmsg(self, *a):
        stamps.append(("s", ns())); return self._sock.sendmsg(*a)


serve = w._Session.serve
def stamped(self, sock):
    try:
        serve(self, Stamped(sock))
    finally:
        calls, first = [], None
        for kind, t in stamps:
            if kind == "r" and first is None:
                first = t
            elif kind == "s" and first is not None:
                calls.append((first, t)); first = None
        with open(os.environ["TAPML_SPLIT_OUT"] + ".tmp", "w") as f:
            json.dump(calls, f)
        os.replace(os.environ["TAPML_SPLIT_OUT"] + ".tmp", os.environ["TAPML_SPLIT_OUT"])
w._Session.serve = stamped
w.serve(w.WorkerConfig(platform="torch-cpu", token=os.environ["TAPML_SPLIT_TOKEN"], announce=True))
'''


FLOOR = r'''
import socket, struct, sys, threading, torch, xxhash
head, entry = struct.Struct("<IIH"), struct.Struct("<BI16s")
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
def serve():
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 16)
    view, clone, prefix = memoryview(buf), torch.ops.aten.clone.default, xxhash.xxh3_128(b"float32\0")
    while True:
        n = c.recv_into(buf)
        if not n:
            return
        if sys.argv[1] == "ping":
            c.send(view[:n])
            continue
        _, _, k = head.unpack_from(buf, 0)
        kind, nbytes, key = entry.unpack_from(buf, head.size)
        x = torch.empty(nbytes // 4)
        memoryview(x.numpy()).cast("B")[:] = view[head.size + entry.size:head.size + entry.size + nbytes]
        y = clone(x)
        out = memoryview(y.numpy()).cast("B")
        h = prefix.copy()
        h.update(out)
        c.sendmsg([head.pack(0, 0, 1), entry.pack(1, out.nbytes, h.digest()), out])
threading.Thread(target=serve).start()
'''


def floor(calls: int, gap_us: float) -> None:
    """The minimal program and the ping-pong (see the module docstring)."""
    import socket
    import struct

    import xxhash

    head, entry = struct.Struct("<IIH"), struct.Struct("<BI16s")
    prefix, buf = xxhash.xxh3_128(b"float32\0"), bytearray(1 << 16)
    for mode in ("ping", "clone"):
        proc = subprocess.Popen([sys.executable, "-c", FLOOR, mode], stdout=subprocess.PIPE, text=True)
        sock = socket.create_connection(("127.0.0.1", int(proc.stdout.readline())))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(calls):
            x = torch.randn(4)
            if gap_us:
                time.sleep(gap_us / 1e6)
            start = time.perf_counter_ns()
            if mode == "ping":
                sock.send(b"x" * 64)
                sock.recv_into(buf)
            else:
                data = memoryview(x.numpy()).cast("B")
                h = prefix.copy()
                h.update(data)
                sock.sendmsg([head.pack(0, 0, 1), entry.pack(1, data.nbytes, h.digest()), data])
                n = sock.recv_into(buf)
                y = torch.empty(4)
                memoryview(y.numpy()).cast("B")[:] = memoryview(buf)[n - 16:n]
            times.append(time.perf_counter_ns() - start)
        sock.close()
        proc.wait()
        print(f"{'64-byte ping-pong' if mode == 'ping' else 'minimal clone round trip'}: "
              f"{statistics.median(times) / 1e3:.1f} µs")


class _Stamped:
    def __init__(self, sock, stamps: list):
        self._sock, self._stamps = sock, stamps

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def recv_into(self, *a):
        k = self._sock.recv_into(*a)
        self._stamps.append(("r", time.perf_counter_ns()))
        return k

    def sendmsg(self, *a):
        self._stamps.append(("s", time.perf_counter_ns()))
        return self._sock.sendmsg(*a)


def main() -> None:
    from tapml.core import OpCall
    from tapml.remote import RemoteTarget

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--gap-us", type=float, default=0.0)
    parser.add_argument("--floor", action="store_true")
    args = parser.parse_args()
    if args.floor:
        floor(args.calls, args.gap_us)
        return
    spec = {"dtype": "float32", "shape": [4], "stride": [1]}
    op = OpCall(op="aten.clone.default", args=[{"tensor": spec}], kwargs={"dict": {}}, outputs={"tensor": spec})
    token, out = secrets.token_hex(16), os.path.join(tempfile.mkdtemp(), "worker.json")
    env = dict(os.environ, TAPML_SPLIT_TOKEN=token, TAPML_SPLIT_OUT=out, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        _, _, host, port = proc.stdout.readline().split()
        target = RemoteTarget(f"{host}:{port}", token=token)
        warm, stamps = 3, []
        for _ in range(warm):
            target.execute(op, [torch.randn(4)])
        target._data = target._reader.sock = _Stamped(target._data, stamps)
        client = []
        for x in [torch.randn(4) for _ in range(args.calls)]:
            if args.gap_us:
                time.sleep(args.gap_us / 1e6)
            stamps.clear()
            start = time.perf_counter_ns()
            target.execute(op, [x])
            end = time.perf_counter_ns()
            sent = next(t for kind, t in stamps if kind == "s")
            got = next(t for kind, t in stamps if kind == "r" and t > sent)
            client.append((start, sent, got, end))
        target.close()
        deadline = time.monotonic() + 30
        while not os.path.exists(out):  # the worker writes its stamps when the session ends
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not write its stamps")
            time.sleep(0.05)
        with open(out) as f:
            worker = json.load(f)[warm:]
    finally:
        proc.kill()
        proc.wait()
    columns: dict[str, list[int]] = {k: [] for k in ("client pre", "wire + wake-up", "worker", "wire + wake-up ",
                                                     "client post", "total")}
    for (start, sent, got, end), (w_got, w_sent) in zip(client, worker, strict=True):
        for name, v in zip(columns, (sent - start, w_got - sent, w_sent - w_got, got - w_sent, end - got, end - start),
                           strict=True):
            columns[name].append(v)
    print(" | ".join(f"{name.strip()} {statistics.median(v) / 1e3:.1f}" for name, v in columns.items()) + " µs")


if __name__ == "__main__":
    main()

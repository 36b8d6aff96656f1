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
Usage: python benchmarks/roundtrip_split.py [--calls 3000] [--gap-us 0]
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
    args = parser.parse_args()
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

"""Transport cost in one run on loopback: tapml's worker vs raw-socket programs vs TVM RPC, interleaved.

- large: a 64 MB float32 tensor round trip.
  - fair raw socket (the limit for a store-and-forward design): a raw-socket program that sends the
    bytes, receives them fully into a fresh tensor on the other side, clones it, and sends the clone
    back into a fresh tensor: the same work as tapml's round trip with no framing, no hashing, no RPC;
  - raw echo: a socket echo server streaming both directions at once through reused buffers (memcpy
    speed; not a fair limit for store and forward, kept for comparison);
  - TVM RPC: ``tvm.runtime.tensor(..., remote.cpu())`` upload + ``.numpy()``;
  - tapml: ``execute`` of ``aten.clone`` on a fresh tensor (upload, clone on the worker, download).
- tiny: a 4-element tensor through TVM RPC and tapml, alternately, many times.

Every side's connection is open at once and the sides take turns in each repetition, so a busy
moment on this shared machine hits all of them. Figures are medians.
Goals: large ≥ 80% of the fair raw socket's throughput and ≥ 10× TVM RPC; tiny ≤ 0.5× TVM RPC's time.
Usage: python benchmarks/transport.py [--repeats 7] [--tiny-repeats 300] [--mb 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager

import numpy as np
import torch

ECHO = """
import socket
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(8 << 20)
while True:
    head = conn.recv(8, socket.MSG_WAITALL)
    if len(head) < 8:
        break
    left = int.from_bytes(head, "little")
    conn.sendall(head)
    while left:
        k = conn.recv_into(buf, min(left, len(buf)))
        conn.sendall(memoryview(buf)[:k])
        left -= k
"""

FAIR = """
import socket, torch
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    head = conn.recv(8, socket.MSG_WAITALL)
    if len(head) < 8:
        break
    n = int.from_bytes(head, "little")
    got = torch.empty(n, dtype=torch.uint8)  # a fresh tensor: it is kept, as a worker keeps its inputs
    view, k = memoryview(got.numpy()), 0
    while k < n:
        k += conn.recv_into(view[k:], n - k)
    out = got.clone()  # the kernel
    conn.sendall(memoryview(out.numpy()))
"""


def _server(code: str) -> tuple[subprocess.Popen, socket.socket]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return proc, sock


@contextmanager
def raw_program(code: str, round_trip):
    """A raw-socket server running ``code``; yields its timed round trip ``round_trip(sock)``."""
    proc, sock = _server(code)
    try:
        yield lambda: round_trip(sock)
    finally:
        sock.close()
        proc.kill()
        proc.wait()


def echo_round_trip(nbytes: int):
    payload = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    back = np.empty(nbytes, dtype=np.uint8)

    def once(sock: socket.socket) -> float:
        start = time.perf_counter()
        sock.sendall(nbytes.to_bytes(8, "little"))
        view, got, sent = memoryview(back), 0, 0
        sock.recv(8, socket.MSG_WAITALL)
        while got < nbytes:  # interleave: the echo server streams back as it reads
            if sent < nbytes:
                chunk = min(4 << 20, nbytes - sent)
                sock.sendall(memoryview(payload)[sent:sent + chunk])
                sent += chunk
            while got < sent:
                got += sock.recv_into(view[got:sent], sent - got)
        return time.perf_counter() - start

    return once


def fair_round_trip(nbytes: int):
    def once(sock: socket.socket) -> float:
        x = torch.randn(nbytes // 4)
        start = time.perf_counter()
        sock.sendall(nbytes.to_bytes(8, "little"))
        sock.sendall(memoryview(x.view(torch.uint8).numpy()))
        back = torch.empty(nbytes, dtype=torch.uint8)
        view, got = memoryview(back.numpy()), 0
        while got < nbytes:
            got += sock.recv_into(view[got:], nbytes - got)
        return time.perf_counter() - start

    return once


@contextmanager
def tvm_session():
    import tvm
    from tvm import rpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        remote = None
        while remote is None:
            try:
                remote = rpc.connect("127.0.0.1", port, session_timeout=300)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the server is still starting; bounded by the deadline
        dev = remote.cpu()

        def maker(nbytes: int):
            host = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)

            def once() -> float:
                start = time.perf_counter()
                arr = tvm.runtime.tensor(host, dev)
                arr.numpy()
                return time.perf_counter() - start

            once()
            return once

        yield maker
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def tapml_session():
    from tapml.core import OpCall
    from tapml.remote import RemoteTarget

    with RemoteTarget(spawn="torch-cpu") as target:
        kernel: dict[int, list[float]] = {}

        def maker(nbytes: int):
            n = nbytes // 4
            spec = {"dtype": "float32", "shape": [n], "stride": [1]}
            op = OpCall(op="aten.clone.default", args=[{"tensor": spec}], kwargs={"dict": {}},
                        outputs={"tensor": spec})
            target.execute(op, [torch.randn(n)])
            kernel[nbytes] = []

            def once() -> float:
                x = torch.randn(n)  # fresh content: nothing is cached by hash
                before = target.stats["kernel_us"]
                start = time.perf_counter()
                target.execute(op, [x])
                elapsed = time.perf_counter() - start
                kernel[nbytes].append((target.stats["kernel_us"] - before) / 1e6)
                return elapsed

            return once

        yield maker, kernel


def interleaved(sides: dict, repeats: int) -> dict[str, float]:
    """Each side once per repetition, in turn; the median of each."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, once in sides.items():
            times[name].append(once())
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiny-repeats", type=int, default=300)
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--skip-tvm", action="store_true")
    parser.add_argument("--json", type=str)
    args = parser.parse_args()
    big, tiny = args.mb << 20, 16
    with ExitStack() as stack:
        tapml, kernel = stack.enter_context(tapml_session())
        large = {"fair": stack.enter_context(raw_program(FAIR, fair_round_trip(big))),
                 "echo": stack.enter_context(raw_program(ECHO, echo_round_trip(big))),
                 "tapml": tapml(big)}
        small = {"tapml": tapml(tiny)}
        if not args.skip_tvm:
            tvm = stack.enter_context(tvm_session())
            large["tvm"], small["tvm"] = tvm(big), tvm(tiny)
        for once in large.values():  # warm every path once
            once()
        r = {f"{k}_large_s": v for k, v in interleaved(large, args.repeats).items()}
        r.update({f"{k}_tiny_s": v for k, v in interleaved(small, args.tiny_repeats).items()})
        r["tapml_large_kernel_s"] = statistics.median(kernel[big])
    report(r, args.mb, big)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


def report(r: dict, mb_label: int, big: int) -> None:
    mb = 2 * big / 1e6  # bytes moved per round trip, both directions
    tvm = "tvm_large_s" in r
    print(f"| path | {mb_label} MB round trip | throughput | tiny round trip |")
    print("|---|---|---|---|")
    print(f"| raw socket: send, receive into a fresh tensor, clone, send back | {r['fair_large_s'] * 1e3:.0f} ms "
          f"| {mb / r['fair_large_s']:.0f} MB/s | |")
    print(f"| raw socket echo (streaming, reused buffers) | {r['echo_large_s'] * 1e3:.0f} ms "
          f"| {mb / r['echo_large_s']:.0f} MB/s | |")
    if tvm:
        print(f"| TVM RPC (upload + download) | {r['tvm_large_s'] * 1e3:.0f} ms | {mb / r['tvm_large_s']:.0f} MB/s "
              f"| {r['tvm_tiny_s'] * 1e6:.0f} µs |")
    print(f"| tapml worker (upload + clone + download) | {r['tapml_large_s'] * 1e3:.0f} ms "
          f"(kernel {r['tapml_large_kernel_s'] * 1e3:.0f} ms) | {mb / r['tapml_large_s']:.0f} MB/s "
          f"| {r['tapml_tiny_s'] * 1e6:.0f} µs |")
    print()
    print(f"- large vs the fair raw socket: **{r['fair_large_s'] / r['tapml_large_s']:.0%}** of its throughput "
          "(goal ≥ 80%)")
    print(f"- large vs the raw echo: {r['echo_large_s'] / r['tapml_large_s']:.0%} of its throughput")
    if tvm:
        print(f"- large vs TVM RPC: **{r['tvm_large_s'] / r['tapml_large_s']:.1f}×** faster (goal ≥ 10×)")
        print(f"- tiny vs TVM RPC: **{r['tapml_tiny_s'] / r['tvm_tiny_s']:.2f}×** its time (goal ≤ 0.5×)")


if __name__ == "__main__":
    main()

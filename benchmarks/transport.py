"""Transport cost in one run on loopback (median of N): tapml's worker vs a raw socket vs TVM RPC.

- large: a 64 MB float32 tensor round trip. tapml: ``execute`` of ``aten.clone`` on a
  fresh tensor (hash, upload, clone on the worker, download); raw: a socket echo
  server; TVM RPC: ``tvm.runtime.tensor(..., remote.cpu())`` upload + ``.numpy()``.
- tiny: the same with a 4-element tensor.

Goals: large ≥ 50% of raw socket throughput and ≥ 5× TVM RPC; tiny ≤ 0.5× TVM RPC's time.
Usage: python benchmarks/transport.py [--repeats 5] [--mb 64]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

ECHO = """
import socket, sys
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


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        times.append(fn())
    return statistics.median(times)


def raw_socket(nbytes: int, repeats: int) -> float:
    proc = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    back = np.empty(nbytes, dtype=np.uint8)

    def once():
        start = time.perf_counter()
        sock.sendall(nbytes.to_bytes(8, "little"))
        view, got = memoryview(back), 0
        sent = 0
        sock.recv(8, socket.MSG_WAITALL)
        while got < nbytes:  # interleave: the echo server streams back as it reads
            if sent < nbytes:
                chunk = min(4 << 20, nbytes - sent)
                sock.sendall(memoryview(payload)[sent:sent + chunk])
                sent += chunk
            while got < sent:
                got += sock.recv_into(view[got:sent], sent - got)
        return time.perf_counter() - start

    try:
        return _median(once, repeats)
    finally:
        sock.close()
        proc.kill()
        proc.wait()


def tvm_rpc(nbytes: int, repeats: int) -> float:
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
                remote = rpc.connect("127.0.0.1", port, session_timeout=120)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the server is still starting; bounded by the deadline
        dev = remote.cpu()
        host = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)

        def once():
            start = time.perf_counter()
            arr = tvm.runtime.tensor(host, dev)
            arr.numpy()
            return time.perf_counter() - start

        once()
        return _median(once, repeats)
    finally:
        proc.kill()
        proc.wait()


def tapml_worker(nbytes: int, repeats: int) -> tuple[float, float]:
    from tapml.core import OpCall
    from tapml.remote import RemoteTarget

    n = nbytes // 4
    spec = {"dtype": "float32", "shape": [n], "stride": [1]}
    op = OpCall(op="aten.clone.default", args=[{"tensor": spec}], kwargs={"dict": {}}, outputs={"tensor": spec})
    with RemoteTarget(spawn="torch-cpu") as target:
        target.execute(op, [torch.randn(n)])
        kernel = []

        def once():
            x = torch.randn(n)  # fresh content: nothing is cached by hash
            before = target.stats["kernel_us"]
            start = time.perf_counter()
            target.execute(op, [x])
            elapsed = time.perf_counter() - start
            kernel.append((target.stats["kernel_us"] - before) / 1e6)
            return elapsed

        total = _median(once, repeats)
        return total, statistics.median(kernel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--json", type=str)
    args = parser.parse_args()
    big, tiny = args.mb << 20, 16
    r = {
        "raw_large_s": raw_socket(big, args.repeats),
        "tvm_large_s": tvm_rpc(big, args.repeats),
        "tvm_tiny_s": tvm_rpc(tiny, max(args.repeats, 50)),
    }
    r["tapml_large_s"], r["tapml_large_kernel_s"] = tapml_worker(big, args.repeats)
    r["tapml_tiny_s"], _ = tapml_worker(tiny, max(args.repeats, 50))
    mb = 2 * big / 1e6  # bytes moved per round trip, both directions
    print(f"| path | {args.mb} MB round trip | throughput | tiny round trip |")
    print("|---|---|---|---|")
    print(f"| raw TCP socket echo | {r['raw_large_s'] * 1e3:.0f} ms | {mb / r['raw_large_s']:.0f} MB/s | |")
    print(f"| TVM RPC (upload + download) | {r['tvm_large_s'] * 1e3:.0f} ms | {mb / r['tvm_large_s']:.0f} MB/s "
          f"| {r['tvm_tiny_s'] * 1e6:.0f} µs |")
    print(f"| tapml worker (hash + upload + clone + download) | {r['tapml_large_s'] * 1e3:.0f} ms "
          f"(kernel {r['tapml_large_kernel_s'] * 1e3:.0f} ms) | {mb / r['tapml_large_s']:.0f} MB/s "
          f"| {r['tapml_tiny_s'] * 1e6:.0f} µs |")
    print()
    print(f"- large vs raw socket: **{r['raw_large_s'] / r['tapml_large_s']:.0%}** of its throughput (goal ≥ 50%)")
    print(f"- large vs TVM RPC: **{r['tvm_large_s'] / r['tapml_large_s']:.1f}×** faster (goal ≥ 5×)")
    print(f"- tiny vs TVM RPC: **{r['tapml_tiny_s'] / r['tvm_tiny_s']:.2f}×** its time (goal ≤ 0.5×)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()

"""Offloaded MiniLM forward on tvm-webgpu (wgpu; lavapipe on a CPU machine) vs tvm-llvm, in one run.

Both through a spawned worker, every offloadable op on the target (plan all), after a warm-up run
that compiles; median of N. Usage: python benchmarks/webgpu.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from tapml.carving import FixtureStore, carve
from tapml.engine import run_step, skip_reason
from tapml.judging import Judge
from tapml.remote import RemoteTarget
from tapml.workloads import load_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    workload = load_workload("zoo:minilm")
    with tempfile.TemporaryDirectory() as tmp:
        carve(workload.model, workload.run, f"{tmp}/store")
        store = FixtureStore(f"{tmp}/store")
        everything = {op["index"] for op in store.ops if not skip_reason(op)}
        rows = {}
        for name in ("tvm-llvm", "tvm-webgpu"):
            with RemoteTarget(spawn=name, timeout=600) as target:
                _, off, _ = run_step(workload.run, store, target, everything, Judge())  # compiles
                offloaded = sum(1 for r in off.results.values() if r.status == "offloaded")
                walls, kernels = [], []
                for _ in range(args.repeats):
                    k0 = target.stats["kernel_us"]
                    _, off, wall = run_step(workload.run, store, target, everything, Judge())
                    walls.append(wall)
                    kernels.append((target.stats["kernel_us"] - k0) / 1e6)
                rows[name] = (statistics.median(walls), statistics.median(kernels), offloaded,
                              target.capabilities().device)
    print("| target | device | ops on the target | offloaded forward (wall) | of which kernels |")
    print("|---|---|---|---|---|")
    for name, (wall, kernel, n, device) in rows.items():
        print(f"| {name} | {device} | {n} | {wall * 1e3:.0f} ms | {kernel * 1e3:.0f} ms |")
    ratio = rows["tvm-webgpu"][0] / rows["tvm-llvm"][0]
    print(f"\ntvm-webgpu / tvm-llvm offloaded forward: **{ratio:.1f}×**")


if __name__ == "__main__":
    main()

"""Carving cost as ratios measured in one run (median of N repeats, the sides interleaved).

- overhead: carve wall time / (plain forward + safetensors write of the same unique bytes)
- floor:    carve wall time / (forward under an empty TorchDispatchMode + the same write): what any
            Python-level tracer pays at least
- open:     FixtureStore(path) (reads, checks every op) against the carve
- dedup:    stored tensor bytes / unique tensor bytes
- memory:   peak RSS of a carve vs a plain forward, each in a fresh process after a warm-up run

Usage: python benchmarks/carve.py [--repeats 5] [--threads N] [--clock wall|cpu] [--json out.json]

``--clock cpu`` times every side by the process's CPU time (user + system, all threads) instead of the
wall clock: on a machine shared with other jobs the wall clock also counts the time spent waiting for a
core, which the carve (more syscalls, more steps) suffers more than a forward.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = [("zoo:minilm", None), ("zoo:tiny-llama", None), ("zoo:tiny-llama", 8)]


_CLOCK = time.perf_counter  # --clock cpu: time.process_time (on a loaded machine the wall clock measures the queue)


def _timed(fn) -> float:
    os.sync()  # start each timed write from the same page-cache state: no writeback of earlier runs
    t = _CLOCK()
    fn()
    return _CLOCK() - t


def measure(spec: str, generate: int | None, repeats: int) -> dict:
    import safetensors.torch
    import torch
    from floor import empty_mode  # benchmarks/floor.py, beside this script

    from tapml.carving import FixtureStore, carve
    from tapml.workloads import load_workload

    workload = load_workload(spec)
    run = lambda: workload.run(generate)  # noqa: E731

    def under_empty_mode():
        with torch.no_grad(), empty_mode():
            run()

    with torch.no_grad():
        run()  # warm-up: first calls allocate and pick kernels
    under_empty_mode()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        carve(workload.model, run, tmp / "warm")
        store = FixtureStore(tmp / "warm")
        unique = {key: store.flat(key).clone() for key in store.tensors}
        forward, empty, write, carving, opening = [], [], [], [], []
        for i in range(repeats):
            with torch.no_grad():
                forward.append(_timed(run))
            empty.append(_timed(under_empty_mode))
            write.append(_timed(lambda i=i: safetensors.torch.save_file(unique, str(tmp / f"w{i}.safetensors"))))
            carving.append(_timed(lambda i=i: carve(workload.model, run, tmp / f"c{i}")))
            opening.append(_timed(lambda i=i: FixtureStore(tmp / f"c{i}")))
            (tmp / f"w{i}.safetensors").unlink()
            shutil.rmtree(tmp / f"c{i}")
        fwd, emp, wr, cv, op = (statistics.median(x) for x in (forward, empty, write, carving, opening))
        return {
            "workload": spec + (f" --generate {generate}" if generate else ""),
            "ops": len(store.ops),
            "forward_s": fwd,
            "empty_mode_forward_s": emp,
            "write_s": wr,
            "carve_s": cv,
            "open_s": op,
            "overhead_ratio": cv / (fwd + wr),
            "floor_ratio": cv / (emp + wr),
            "unique_tensor_bytes": store.unique_tensor_bytes,
            "stored_bytes": store.stored_bytes,
            "dedup_ratio": store.stored_bytes / store.unique_tensor_bytes,
            "referenced_bytes": store.manifest["stats"]["bytes_referenced"],
        }


_PEAK = """
import sys, tempfile, torch
from tapml.workloads import load_workload
from tapml.carving import carve
spec, gen, mode = sys.argv[1], (int(sys.argv[2]) or None), sys.argv[3]
w = load_workload(spec)
with torch.no_grad():
    w.run(gen)
with tempfile.TemporaryDirectory() as d:  # same lazy imports (torch._dynamo) in both modes
    carve(torch.nn.Identity(), lambda: torch.ones(2) + 1, d + "/s")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: measure only what follows
if mode == "carve":
    with tempfile.TemporaryDirectory() as d:
        carve(w.model, lambda: w.run(gen), d + "/s")
else:
    with torch.no_grad():
        w.run(gen)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(int(hwm.split()[1]) * 1024)
"""


def peak_rss(spec: str, generate: int | None, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK, spec, str(generate or 0), mode],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    global _CLOCK
    if args.clock == "cpu":
        _CLOCK = time.process_time
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads, here and in the RSS subprocesses
    import torch

    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats}, clock: {args.clock}, "
          f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for spec, gen in WORKLOADS:
        row = measure(spec, gen, args.repeats)
        row["peak_rss_forward"] = peak_rss(spec, gen, "forward")
        row["peak_rss_carve"] = peak_rss(spec, gen, "carve")
        rows.append(row)
    print("| workload | ops | forward | forward, empty mode | safetensors write | carve | carve / (forward + write) "
          "| carve / (empty mode + write) | open store | dedup stored/unique | referenced / unique "
          "| peak RSS forward → carve |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['ops']} | {r['forward_s'] * 1e3:.1f} ms "
              f"| {r['empty_mode_forward_s'] * 1e3:.1f} ms "
              f"| {r['write_s'] * 1e3:.1f} ms | {r['carve_s'] * 1e3:.1f} ms | **{r['overhead_ratio']:.2f}** "
              f"| **{r['floor_ratio']:.2f}** | {r['open_s'] * 1e3:.1f} ms | {r['dedup_ratio']:.4f} "
              f"| {r['referenced_bytes'] / r['unique_tensor_bytes']:.1f}× "
              f"| {r['peak_rss_forward'] / 2**20:.0f} → {r['peak_rss_carve'] / 2**20:.0f} MiB |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

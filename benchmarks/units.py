"""Top-down units vs per-op offload, in one run per target: MiniLM and tiny-llama on tvm-llvm (and tvm-webgpu).

Per workload × target (in process: the remote worker does not compile units yet):

- compute inside compiled units: the share of the carved compute ops (not views) that run inside a unit
  of the top-down plan, by op count and by multiply-adds (matmul-like ops: from their shapes; every
  other op: one per output element)
- units compiled / fallen back, with reasons (the first few)
- TVM compiles, cold (a fresh ``TAPML_CACHE_DIR``): unit builds vs unique unit signatures; then a new
  platform on the same cache (warm): builds (goal 0)
- offloaded forward: top-down (units + the ops outside them on the target) vs per-op (every offloadable
  op on the target, the last step of plan ``layers``), interleaved, median of N; round trips per
  forward (target calls: units + ops) and the target's time of each
- ``--remote``: the per-op forward through a spawned tvm-llvm worker as well (what the issue's
  "~1.1 s per offloaded forward" measured; units over RPC are not there yet)

Usage: python benchmarks/units.py [--repeats 5] [--threads N] [--targets tvm-llvm,tvm-webgpu]
[--workloads minilm,tiny-llama] [--remote]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections import Counter

import torch

from tapml.carving import FixtureStore, carve
from tapml.engine import run_step, skip_reason
from tapml.engine.topdown import plan_top_down, top_down_steps
from tapml.judging import Judge
from tapml.platforms import LocalTarget, get_platform
from tapml.workloads import load_workload

_MATMUL = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default",
           "aten.linear.default", "aten.matmul.default"}


def macs(call) -> int:
    """Multiply-adds of a matmul-like op from its shapes; one per output element for any other op."""
    ins = [s.shape for s in call.inputs]
    out = sum(math.prod(s.shape) for s in call.output_specs)
    if call.op in _MATMUL and ins:
        a = ins[1] if call.op in ("aten.addmm.default", "aten.baddbmm.default") else ins[0]
        return out * (a[-1] if a else 1)
    if call.op == "aten.convolution.default" and len(ins) >= 2:
        w = ins[1]
        return out * math.prod(w[1:])
    if call.op.startswith("aten._scaled_dot_product") and len(ins) >= 3:
        q, k = ins[0], ins[1]
        return 2 * math.prod(q) * k[-2]
    return out


def share(store: FixtureStore, td) -> dict:
    compute = [i for i in range(len(store.ops)) if skip_reason(store.ops[i]) is None]
    inside = {i for layer in td.frontier for i in range(*store.layers[layer]["ops"])}
    weight = {i: macs(store.op_call(i)) for i in compute}
    total = sum(weight.values()) or 1
    return {"ops": len(compute), "ops_inside": sum(i in inside for i in compute),
            "macs": total, "macs_inside": sum(w for i, w in weight.items() if i in inside)}


def plan_and_compiles(store: FixtureStore, name: str) -> tuple:
    """The top-down plan on a fresh platform (cold), then again on a new one (warm): counts and seconds."""
    out = {}
    for label in ("cold", "warm"):
        target = LocalTarget(get_platform(name))
        start = time.perf_counter()
        td = plan_top_down(store, target)
        out[f"{label}_s"] = time.perf_counter() - start
        out[f"{label}_builds"] = target.stats.get("builds", 0)
    rows = sorted(td.rows.values(), key=lambda r: (r.ops[0], -r.ops[1]))
    out["signatures"] = len({r.signature for r in rows if r.status == "compiled"})
    return target, td, rows, out


def forwards(workload, store: FixtureStore, target, td, repeats: int) -> dict:
    """Top-down and per-op offloaded forwards, interleaved; medians and round trips."""
    last = top_down_steps(store, td)[-1]
    everything = {op["index"] for op in store.ops if not skip_reason(op)}
    modes = {"top-down": (set(last["offload"]), last["units"]), "per-op": (everything, None)}
    for sel, units in modes.values():  # warm-up: compiles the ops (and builds the pipelines)
        run_step(workload.run, store, target, sel, Judge(), units=units)
    rows: dict[str, list] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode, (sel, units) in modes.items():
            before = Counter(target.stats)
            _, mixed, wall = run_step(workload.run, store, target, sel, Judge(), units=units)
            delta = Counter(target.stats)
            delta.subtract(before)
            unit_s = mixed.units.target_s if mixed.units is not None else 0.0
            rows[mode].append({"wall": wall, "target": mixed.target_seconds + unit_s, "compare": mixed.compare_s,
                               "trips": delta["runs"] + delta["unit_runs"], "units": delta["unit_runs"]})
    with torch.no_grad():
        plain = []
        for _ in range(repeats):
            start = time.perf_counter()
            workload.run()
            plain.append(time.perf_counter() - start)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rows.items()}
    return {**med, "forward": statistics.median(plain)}


def remote_per_op(workload, store: FixtureStore, name: str, repeats: int) -> float:
    from tapml.remote import RemoteTarget

    everything = {op["index"] for op in store.ops if not skip_reason(op)}
    with RemoteTarget(spawn=name, timeout=600) as target:
        run_step(workload.run, store, target, everything, Judge())
        return statistics.median(run_step(workload.run, store, target, everything, Judge())[2]
                                 for _ in range(repeats))


def bench(wname: str, targets: list[str], repeats: int, remote: bool) -> list[dict]:
    workload = load_workload(f"zoo:{wname}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        carve(workload.model, workload.run, f"{tmp}/store")
        store = FixtureStore(f"{tmp}/store")
        for name in targets:
            os.environ["TAPML_CACHE_DIR"] = f"{tmp}/cache-{name}"  # cold: nothing compiled yet
            target, td, rows, compiles = plan_and_compiles(store, name)
            r = {"workload": wname, "target": name, **compiles, **share(store, td),
                 "compiled": [r.module for r in rows if r.status == "compiled"],
                 "fell_back": [(r.module or "(model)", r.reason) for r in rows
                               if r.status in ("fell back", "not a unit")],
                 **forwards(workload, store, target, td, repeats)}
            if remote and name == "tvm-llvm":
                r["remote_per_op"] = remote_per_op(workload, store, name, repeats)
            results.append(r)
            target.close()
    return results


def report(r: dict) -> None:
    td, po = r["top-down"], r["per-op"]
    print(f"\n### {r['workload']} on {r['target']}\n")
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| compute inside compiled units, by multiply-adds | {r['macs_inside'] / r['macs']:.1%} "
          f"({r['macs_inside']:,} of {r['macs']:,}) | ≥ 95% (MiniLM) |")
    print(f"| compute inside compiled units, by op count | {r['ops_inside'] / max(r['ops'], 1):.1%} "
          f"({r['ops_inside']} of {r['ops']} compute ops) | |")
    print(f"| units compiled / fell back or not a unit | {len(r['compiled'])} / {len(r['fell_back'])} | |")
    print(f"| unit builds, cold cache | {r['cold_builds']} for {r['signatures']} unique unit signatures "
          f"({r['cold_s']:.1f} s) | = signatures |")
    print(f"| unit builds, rerun with the disk cache | {r['warm_builds']} ({r['warm_s']:.1f} s) | 0 |")
    print(f"| offloaded forward, per-op / top-down (median of the interleaved runs) | {po['wall'] * 1e3:.0f} ms / "
          f"{td['wall'] * 1e3:.0f} ms = **{po['wall'] / td['wall']:.1f}×** | ≥ 5× (MiniLM, tvm-llvm) |")
    print(f"| round trips per forward, per-op / top-down | {po['trips']:.0f} / {td['trips']:.0f} "
          f"({td['units']:.0f} units + {td['trips'] - td['units']:.0f} ops outside them) | units, not ops |")
    print(f"| target time per forward, per-op / top-down | {po['target'] * 1e3:.0f} ms / {td['target'] * 1e3:.0f} ms "
          "| |")
    print(f"| comparison time per forward, per-op / top-down | {po['compare'] * 1e3:.0f} ms / "
          f"{td['compare'] * 1e3:.0f} ms | |")
    print(f"| the model's own forward (no tapml) | {r['forward'] * 1e3:.1f} ms | |")
    if "remote_per_op" in r:
        print(f"| per-op forward through a spawned {r['target']} worker / top-down in process | "
              f"{r['remote_per_op'] * 1e3:.0f} ms / {td['wall'] * 1e3:.0f} ms = "
              f"**{r['remote_per_op'] / td['wall']:.1f}×** | |")
    reasons = Counter(why for _, why in r["fell_back"])
    if reasons:
        print("\nFell back (the plan descended into their children) or not a unit, by reason:\n")
        for why, n in reasons.most_common(6):
            first = next(m for m, w in r["fell_back"] if w == why)
            print(f"- {n}× ({first} …): {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--targets", default="tvm-llvm,tvm-webgpu")
    parser.add_argument("--workloads", default="minilm,tiny-llama")
    parser.add_argument("--remote", action="store_true", help="also the per-op forward through a spawned worker")
    parser.add_argument("--threads", type=int, help="torch and TVM threads, here and in the worker (default: theirs)")
    args = parser.parse_args()
    if args.threads:  # on a shared, loaded machine, two spinning threads per pool stall each other
        for var in ("OMP_NUM_THREADS", "TVM_NUM_THREADS"):
            os.environ[var] = str(args.threads)
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, TVM threads: {os.environ.get('TVM_NUM_THREADS', 'default')}, "
          f"repeats: {args.repeats}")
    for wname in args.workloads.split(","):
        for r in bench(wname, args.targets.split(","), args.repeats, args.remote):
            report(r)


if __name__ == "__main__":
    main()

"""The per-op comparison of a mixed run, alone: µs per offloaded op on zoo:minilm.

A per-op offload judges every offloaded op's outputs against the carve (``MixedRun``:
``store.outputs(index, read_only=True)``, the outputs' liveness, ``judge.judge(op, outputs, want,
live, oracle=False, live=flows)``, all timed into ``compare_s``). This benchmark captures the
target's outputs of one full per-op offload (torch-cpu in this process: bit-identical to the spawned
torch-cpu worker's on this machine) and replays exactly that block over them, in two cases:

- bit-exact: the outputs as the target gave them (the offload benchmark's case);
- 1-ULP: every float output with one element in three moved one ULP up, within the float32
  tolerance (a target that sums in another order): the cheap tier's float64 pass;
- bit-exact, keyed: as a spawned worker's outputs come, with the content key the worker hashed them
  under (computed before the timed block, as the worker does on its side): ``engine.carved_for`` lets
  each stand for its carved self, and nothing is read from the store.

Each case is timed as a repeated forward pays it (every later step of a migration: the store's
read-only uses and the carved outputs' NaN/Inf counts cached) and as the first forward pays it (both
emptied before each pass).
With ``--against REF`` the judging package as it was at git REF is loaded beside this one and the
two run interleaved, pass by pass (each pass a median over the repeats); every verdict and metric
of the two must be identical, else the benchmark fails. Goal: ≤ 40 µs per op.

Usage: python benchmarks/compare.py [--repeats 21] [--threads 1] [--against main]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tapml.carving import FixtureStore, carve
from tapml.core import content_key
from tapml.engine import carved_for, run_step, skip_reason
from tapml.judging import Judge
from tapml.platforms import Target, open_local
from tapml.workloads import load_workload

ROOT = Path(__file__).resolve().parent.parent


def old_judging(ref: str, where: Path):
    """``tapml/judging`` as it was at git ``ref``, importable beside today's (as ``judging_<ref>``)."""
    name = "judging_" + "".join(c if c.isalnum() else "_" for c in ref)
    package = where / name
    package.mkdir()
    files = subprocess.run(["git", "ls-tree", "--name-only", f"{ref}:tapml/judging"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for file in files:
        if file.endswith(".py"):
            text = subprocess.run(["git", "show", f"{ref}:tapml/judging/{file}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            (package / file).write_text(text)
    sys.path.insert(0, str(where))
    return importlib.import_module(name)


def capture(workload, store) -> list:
    """(op, the target's outputs, the live inputs, the judge's keywords) of every op a full per-op
    offload judges, in order."""
    calls = []

    class Capturing(Judge):
        def judge(self, op, got, want, inputs=None, **kwargs):
            calls.append((op, [g.clone() for g in got], inputs, kwargs))
            return super().judge(op, got, want, inputs, **kwargs)

    everything = {op["index"] for op in store.ops if not skip_reason(op)}
    run_step(workload.run, store, open_local("torch-cpu"), everything, Capturing())
    return calls


def one_ulp(calls) -> list:
    """The same calls with one float element in three one ULP up (within the float32 tolerance)."""
    def nudge(t):
        if not t.is_floating_point() or not t.numel():
            return t
        up = torch.nextafter(t, torch.full_like(t, float("inf")))
        pick = (torch.arange(t.numel()) % 3 == 0).reshape(t.shape)
        return torch.where(pick, up, t)
    return [(op, [nudge(g) for g in got], inputs, kwargs) for op, got, inputs, kwargs in calls]


class Keyed(Target):
    """The content keys a worker sent with the outputs (``RemoteTarget.content_key``), known up front."""

    name = "keyed"

    def __init__(self, calls) -> None:
        self.keys = {id(g): content_key(g.reshape(-1)) for _, got, _, _ in calls for g in got}

    def content_key(self, output: torch.Tensor) -> str | None:
        return self.keys.get(id(output))


def one_pass(store, judge, calls, fresh: bool, target: Target) -> tuple[float, list]:
    """mixed.py's timed block over every call: (seconds, the metrics)."""
    if fresh:  # the first forward: every use read from its shard, every count computed (by this judge's package)
        sys.modules[type(judge).__module__.rpartition(".")[0] + ".carved"].clear()
        store.forget_uses()
    out = []
    start = time.perf_counter()
    for op, got, inputs, kwargs in calls:
        want = carved_for(store, op.index, got, target)
        flows = [store.graph.live(op.index, k) for k in range(len(want))]
        out.append(judge.judge(op, got, want, inputs, **{**kwargs, "live": flows}))
    return time.perf_counter() - start, out


def measure(store, judges: dict, calls, repeats: int, fresh: bool, target: Target) -> dict:
    """µs per op of each judge, interleaved pass by pass; their metrics must agree."""
    times = {name: [] for name in judges}
    seen = {}
    for name, judge in judges.items():  # warm: store handles, tolerance memos, the content check
        _, metrics = one_pass(store, judge, calls, fresh, target)
        seen[name] = [repr(m) for m in metrics]
    first = next(iter(seen.values()))
    for name, reprs in seen.items():
        if reprs != first:
            bad = next(i for i, (a, b) in enumerate(zip(first, reprs, strict=True)) if a != b)
            raise SystemExit(f"{name} differs at call {bad}:\n{first[bad]}\n{reprs[bad]}")
    for _ in range(repeats):
        for name, judge in judges.items():
            times[name].append(one_pass(store, judge, calls, fresh, target)[0])
    return {name: statistics.median(t) / len(calls) * 1e6 for name, t in times.items()}


def minilm(where: str) -> tuple[FixtureStore, list]:
    """zoo:minilm carved into ``where``, and the calls its full per-op offload judges."""
    workload = load_workload("zoo:minilm")
    carve(workload.model, workload.run, f"{where}/store")
    store = FixtureStore(f"{where}/store")
    return store, capture(workload, store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--against", help="a git ref whose tapml/judging runs beside this one, interleaved")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        store, calls = minilm(tmp)
        judges = {"this tree": Judge()}
        if args.against:
            judges = {args.against: old_judging(args.against, Path(tmp)).Judge(), **judges}
        unkeyed = Target()  # a target that knows no keys (in this process): every carved output is read
        cases = {"bit-exact": (calls, unkeyed), "1-ULP": (one_ulp(calls), unkeyed),
                 "bit-exact, keyed (a worker's)": (calls, Keyed(calls))}
        rows = [(case, fresh, measure(store, judges, c, args.repeats, fresh, target))
                for case, (c, target) in cases.items() for fresh in (False, True)]
    names = list(judges)
    print(f"{len(calls)} ops judged per forward (zoo:minilm, every offloadable op), µs per op, "
          f"median of {args.repeats} passes")
    print("| outputs | forward (store uses, NaN/Inf counts of the carve) | " + " | ".join(names) + " | goal |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for case, fresh, us in rows:
        cells = " | ".join(f"{us[n]:.1f}" for n in names)
        ratio = f" ({us[names[0]] / us[names[-1]]:.1f}× faster)" if len(names) > 1 else ""
        print(f"| {case} | {'first (read, computed)' if fresh else 'repeated (cached)'} | {cells}{ratio} | ≤ 40 |")


if __name__ == "__main__":
    main()

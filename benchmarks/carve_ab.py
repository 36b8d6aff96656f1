"""Carve at scale, two checkouts against each other: settles whether a change made the carve slower when
the disk's page cache moves single runs by 2x.

Each run is a fresh process in one checkout's ``.venv`` (a checkout may carry ``:NAME=VALUE``, set in its
environment), the checkouts alternating ABBA. A process builds ``scale.py``'s model, carves once (warm-up,
and the unique bytes), then per repeat: the forward, the ``safetensors`` write of the unique bytes (the
sequence ``scale.py`` times; ``--no-write`` leaves it out), the carve. ``os.sync()`` before every timed
step; wall, user and system CPU seconds and minor page faults of each. Medians per checkout, with the
first carve of a process and the later ones apart (a process's first carve finds the most fresh memory).

Usage: python benchmarks/carve_ab.py --size 290m --rounds 4 --repeats 3 OLD_CHECKOUT NEW_CHECKOUT[:NAME=VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(fn) -> dict:
    os.sync()
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": wall, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
            "minflt": r1.ru_minflt - r0.ru_minflt}


def worker(size: str, repeats: int, write: bool) -> None:
    """One checkout's figures (run with that checkout as the working directory), as one JSON line."""
    sys.path.insert(0, str(Path.cwd() / "benchmarks"))
    import safetensors.torch
    import torch
    from scale import NEW_TOKENS, build

    from tapml.carving import FixtureStore, carve

    model, workload = build(size)
    run = lambda: workload.run(NEW_TOKENS)  # noqa: E731
    info = {"spec": None, "name": workload.name, "class": type(model).__name__, "generate": NEW_TOKENS}
    with torch.no_grad():
        run()
    tmp = Path(tempfile.mkdtemp(prefix="tapml-carve-ab-"))
    out: dict[str, list] = {"forward": [], "write": [], "carve": []}
    try:
        carve(model, run, tmp / "store", model_info=info)
        store = FixtureStore(tmp / "store")
        for i in range(repeats):
            with torch.no_grad():
                out["forward"].append(_timed(run))
            if write:
                unique = {key: store.flat(key) for key in store.tensors}
                out["write"].append(_timed(lambda u=unique: safetensors.torch.save_file(u, str(tmp / "w"))))
                del unique
                (tmp / "w").unlink()
            out["carve"].append(_timed(lambda i=i: carve(model, run, tmp / f"c{i}", model_info=info)))
            shutil.rmtree(tmp / f"c{i}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("RESULT " + json.dumps(out))


def _row(runs: list[dict]) -> str:
    def med(items: list[dict], field: str) -> float:
        return statistics.median(x[field] for x in items) if items else float("nan")

    carves = [c for r in runs for c in r["carve"]]
    first, later = [r["carve"][0] for r in runs], [c for r in runs for c in r["carve"][1:]]
    fwd, wr = med([x for r in runs for x in r["forward"]], "wall"), med([x for r in runs for x in r["write"]], "wall")
    return (f"carve wall {med(carves, 'wall'):.2f} s, user {med(carves, 'user'):.2f}, sys {med(carves, 'sys'):.2f} "
            f"(first of a process: wall {med(first, 'wall'):.2f}, sys {med(first, 'sys'):.2f}; later: wall "
            f"{med(later, 'wall'):.2f}, sys {med(later, 'sys'):.2f}); forward {fwd:.2f} s, write {wr:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", help="CHECKOUT or CHECKOUT:NAME=VALUE")
    parser.add_argument("--size", default="290m")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="no safetensors write before each carve")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs: dict[str, list] = {c: [] for c in args.checkouts}
    for r in range(args.rounds):
        for spec in args.checkouts if r % 2 == 0 else args.checkouts[::-1]:
            path, _, setting = spec.partition(":")
            env = dict(os.environ, **dict([setting.split("=", 1)])) if setting else None
            load = os.getloadavg()[0]
            p = subprocess.run([f"{path}/.venv/bin/python", str(Path(__file__).resolve()), "--worker", args.size,
                                str(args.repeats), str(int(not args.no_write))],
                               cwd=path, capture_output=True, text=True, env=env)
            result = next((line[7:] for line in p.stdout.splitlines() if line.startswith("RESULT ")), None)
            if result is None:
                raise SystemExit(f"{spec} failed:\n{p.stdout}{p.stderr}")
            runs[spec].append(dict(json.loads(result), load=load))
            carves = runs[spec][-1]["carve"]
            print(f"round {r} {spec} (load {load:.2f}): carve wall "
                  + " ".join(f"{c['wall']:.2f}" for c in carves) + " sys "
                  + " ".join(f"{c['sys']:.2f}" for c in carves), flush=True)
    print(f"\n{args.size}, {args.rounds} rounds x {args.repeats} repeats, medians:")
    for spec, items in runs.items():
        print(f"{spec}: {_row(items)}")
    if args.json:
        args.json.write_text(json.dumps(runs))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
    else:
        main()

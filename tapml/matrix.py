"""The zoo matrix: every workload carved once and offloaded to every target through a
spawned worker, as a table (markdown + JSON) of what survives and what diverges."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .carving import FixtureStore, carve
from .judge import Judge
from .migrate import migrate
from .remote import RemotePlatform
from .workloads import load_workload

__all__ = ["TARGETS", "run_matrix", "to_markdown"]

TARGETS = ("torch-cpu", "fp16", "bf16", "tvm-llvm")


def run_matrix(names: list[str], targets: tuple[str, ...] = TARGETS,
               on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per workload × target; one worker per target serves every workload."""
    workers = {t: RemotePlatform(spawn=t, timeout=300) for t in targets}
    rows = []
    try:
        for name in names:
            workload = load_workload(f"zoo:{name}")
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                carve(workload.model, workload.run, Path(tmp) / "store")
                carve_s = time.perf_counter() - start
                store = FixtureStore(Path(tmp) / "store")
                signatures = len({op["signature"] for op in store.ops})
                for target_name, target in workers.items():
                    judge = Judge(compute_dtype=target.capabilities().compute_dtype)
                    start = time.perf_counter()
                    try:
                        r = migrate(workload.run, store, target, judge=judge, plan="all")
                    except Exception as e:  # a tapml bug: the matrix records it instead of stopping
                        row = {"model": name, "target": target_name, "verdict": "error",
                               "error": f"{type(e).__name__}: {e}"}
                    else:
                        c = r["culprit"] or {}
                        local = [o["local"]["max_abs"] for o in r["ops"] if o.get("local")]
                        row = {"model": name, "target": target_name, "verdict": r["verdict"], "ops": len(store.ops),
                               "signatures": signatures, "coverage": r["coverage"], "counts": r["counts"],
                               "culprit_op": c.get("op"), "culprit_module": c.get("module"),
                               "culprit_error": (c.get("local") or {}).get("max_abs"),
                               "culprit_why": (c.get("local") or {}).get("why"),
                               "end_to_end": r["end_to_end"].get("max_abs"),
                               "max_local_error": max(local, key=lambda v: float(v)) if local else None,
                               "unsupported": sorted({o["reason"] for o in r["ops"] if o["status"] == "unsupported"})}
                    row["carve_s"], row["offload_s"] = carve_s, time.perf_counter() - start
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    finally:
        for w in workers.values():
            w.close()
    return rows


def _cell(row: dict) -> str:
    if row["verdict"] == "error":
        return "**tapml error**"
    if row["verdict"] == "ok":
        return "ok"
    if row.get("culprit_op"):
        return f"{row['verdict']}: `{row['culprit_op'].split('.')[1]}`"
    return row["verdict"]


def to_markdown(rows: list[dict], targets: tuple[str, ...] = TARGETS) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["target"]): r for r in rows}
    head = ["model", "ops", "signatures", "carve s", *targets, "tvm-llvm coverage", "offload s (all targets)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        first = next(r for r in rows if r["model"] == m)
        tvm = by.get((m, "tvm-llvm"), {})
        cov = f"{tvm['coverage']:.0%}" if tvm.get("coverage") is not None else ""
        total = sum(by[(m, t)]["offload_s"] for t in targets if (m, t) in by)
        lines.append(f"| {m} | {first.get('ops', '')} | {first.get('signatures', '')} | {first['carve_s']:.1f} | "
                     + " | ".join(_cell(by[(m, t)]) if (m, t) in by else "" for t in targets)
                     + f" | {cov} | {total:.1f} |")
    lines += ["", "Divergent cells — the culprit (first op whose *local* error is out of tolerance), its error and "
              "tapml's reading of it:", "", "| model | target | culprit op | module | local max abs | why |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["verdict"] not in ("ok",):
            err = r.get("culprit_error")
            err = err if isinstance(err, str) else (f"{err:.3g}" if err is not None else "")
            why = r.get("culprit_why") or r.get("error") or f"end-to-end max abs {r.get('end_to_end')}"
            lines.append(f"| {r['model']} | {r['target']} | `{r.get('culprit_op') or ''}` | "
                         f"{r.get('culprit_module') or ''} | {err} | {why} |")
    return "\n".join(lines) + "\n"

"""The zoo matrix: every workload carved once and offloaded to every target through a
spawned worker, as a table (markdown + JSON) of what survives and what diverges."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .carving import FixtureStore, carve
from .core import jsonable
from .engine import migrate
from .settings import Settings
from .workloads import load_workload

__all__ = ["TARGETS", "run_matrix", "run_matrix_to", "to_markdown"]

TARGETS = ("torch-cpu", "fp16", "bf16", "tvm-llvm")


def run_matrix(names: list[str], targets: tuple[str, ...] = TARGETS,
               on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per workload × target; one worker per target serves every workload."""
    settings = Settings(timeout=300)
    workers = {t: settings.open_target(t) for t in targets}
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
                    start = time.perf_counter()
                    try:
                        r = migrate(workload.run, store, target, judge=settings.judge(target), plan="all")
                    except Exception as e:  # a tapml bug: the matrix records it instead of stopping
                        row = {"model": name, "target": target_name, "verdict": "error",
                               "error": f"{type(e).__name__}: {e}"}
                    else:
                        c = r.culprit
                        local = [o.local.max_abs for o in r.ops if o.local is not None]
                        row = {"model": name, "target": target_name, "verdict": str(r.verdict), "ops": len(store.ops),
                               "signatures": signatures, "coverage": r.coverage, "counts": r.counts,
                               "culprit_op": c.op if c else None, "culprit_module": c.module if c else None,
                               "culprit_error": c.local.max_abs if c else None,
                               "culprit_why": c.local.why if c else None,
                               "end_to_end": r.end_to_end.max_abs,
                               "max_local_error": max(local) if local else None,
                               "unsupported": sorted({o.reason for o in r.ops if o.status == "unsupported"})}
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


def run_matrix_to(names: list[str], targets: tuple[str, ...], out: str | None,
                  on_row: Callable[[dict], None] | None = None) -> tuple[list[dict], str]:
    """``tapml zoo --matrix``: the rows and their markdown, written to ``out`` when given."""
    from .core import TapmlError
    from .zoo import ZOO

    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise TapmlError(f"no zoo workload {unknown[0]!r}; `tapml zoo` lists them")
    rows = run_matrix(names, targets, on_row=on_row)
    text = to_markdown(rows, targets)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "zoo-matrix.md").write_text(text)
        (Path(out) / "zoo-matrix.json").write_text(json.dumps(jsonable(rows), indent=1))
    return rows, text

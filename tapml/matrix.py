"""The zoo matrix: every workload carved once and offloaded to every target through a
spawned worker, as a table (markdown + JSON) of what survives and what diverges; with
``tvm-llvm`` among the targets, a top-down column too: whether the model's repeated blocks
(its layers) compile as whole TVM units, and the first unit that does not, with TVM's reason."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .carving import FixtureStore, carve
from .core import jsonable
from .engine import find_blocks, migrate, plan_top_down
from .settings import Settings
from .workloads import load_workload

__all__ = ["TARGETS", "TOP_DOWN", "run_matrix", "run_matrix_to", "to_markdown", "top_down_row"]

TARGETS = ("torch-cpu", "fp16", "bf16", "tvm-llvm")
TOP_DOWN = "tvm-llvm top-down"  # the pseudo-target of the top-down column


def top_down_row(name: str, store: FixtureStore, target) -> dict:
    """The top-down plan on ``target`` (compiles only): which repeated blocks compile as units, and the
    first module call TVM would not compile (status "fell back"), with its reason."""
    start = time.perf_counter()
    td = plan_top_down(store, target)
    blocks = set(find_blocks(store))
    rows = sorted(td.rows.values(), key=lambda r: (r.ops[0], -r.ops[1]))
    layers = [r for r in rows if r.module in blocks]
    compiled = [r for r in rows if r.status == "compiled"]
    refused = [r for r in rows if r.status == "fell back" and r.signature]  # TVM's refusals, not the plan's
    first = refused[0] if refused else None
    whole = bool(layers) and all(r.status == "compiled" for r in layers)
    if not blocks:  # no repeated blocks: the outermost calls are the units
        whole = bool(compiled) and not refused
    return {"model": name, "target": TOP_DOWN, "verdict": "layers" if whole else ("partial" if compiled else "none"),
            "blocks": len(layers), "blocks_compiled": sum(r.status == "compiled" for r in layers),
            "units": len(compiled), "signatures": len({r.signature for r in compiled}),
            "fell_back": len(refused), "not_units": sum(r.status == "not a unit" for r in rows),
            "ops_inside": sum(r.ops[1] - r.ops[0] for r in compiled), "ops": len(store.ops),
            "first_refused": first.module if first else None, "first_refused_class": first.cls if first else None,
            "reason": first.reason if first else None, "offload_s": time.perf_counter() - start}


def run_matrix(names: list[str], targets: tuple[str, ...] = TARGETS,
               on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per workload × target; one worker per target serves every workload."""
    settings = Settings(timeout=300)
    workers = {t: settings.open_target(t) for t in targets}
    if "tvm-llvm" in targets:  # in process: the remote worker does not compile units yet
        workers[TOP_DOWN] = Settings(in_process=True).open_target("tvm-llvm")
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
                    if target_name == TOP_DOWN:
                        try:
                            row = top_down_row(name, store, target)
                        except Exception as e:  # a tapml bug: recorded, not fatal
                            row = {"model": name, "target": TOP_DOWN, "verdict": "error",
                                   "error": f"{type(e).__name__}: {e}", "offload_s": time.perf_counter() - start}
                        row["carve_s"] = carve_s
                        rows.append(row)
                        if on_row is not None:
                            on_row(row)
                        continue
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


def _top_cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["verdict"] == "error":
        return "**tapml error**"
    layers = f"{row['blocks_compiled']}/{row['blocks']} layers" if row["blocks"] else "no repeated blocks"
    cell = f"{layers}, {row['units']} units ({row['signatures']} compiles)"
    first = row["first_refused"]
    return cell + (f"; first refused: `{first or '(model)'}`" if first is not None else "")


def _top_down_notes(top: list[dict]) -> list[str]:
    whole = sum(r["verdict"] == "layers" for r in top)
    lines = [f"Top-down on tvm-llvm (in process; compiles only, no run): **{whole} of {len(top)}** workloads compile "
             "every repeated block (layer) as one TVM unit (without repeated blocks: every outermost call). "
             "*n units (k compiles)*: module calls compiled whole and how many unique unit signatures that took; "
             "the first call TVM refused (the plan then descends into its children), with TVM's reason:", "",
             "| model | first refused unit | class | TVM's reason |", "|---|---|---|---|"]
    for r in top:
        if r.get("first_refused") is not None or r["verdict"] == "error":
            why = (r.get("reason") or r.get("error") or "").replace("|", "\\|")
            where = r.get("first_refused") or "(model)"
            lines.append(f"| {r['model']} | {where} | {r.get('first_refused_class') or ''} | {why} |")
    return lines


def to_markdown(rows: list[dict], targets: tuple[str, ...] = TARGETS) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["target"]): r for r in rows}
    top = [r for r in rows if r["target"] == TOP_DOWN]
    head = ["model", "ops", "signatures", "carve s", *targets, "tvm-llvm coverage", "offload s (all targets)"] + \
        ([TOP_DOWN] if top else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        first = next(r for r in rows if r["model"] == m)
        tvm = by.get((m, "tvm-llvm"), {})
        cov = f"{tvm['coverage']:.0%}" if tvm.get("coverage") is not None else ""
        total = sum(by[(m, t)]["offload_s"] for t in targets if (m, t) in by)
        lines.append(f"| {m} | {first.get('ops', '')} | {first.get('signatures', '')} | {first['carve_s']:.1f} | "
                     + " | ".join(_cell(by[(m, t)]) if (m, t) in by else "" for t in targets)
                     + f" | {cov} | {total:.1f} |" + (f" {_top_cell(by.get((m, TOP_DOWN)))} |" if top else ""))
    if top:
        lines += ["", *_top_down_notes(top)]
    lines += ["", "Divergent cells — the culprit (first op whose *local* error is out of tolerance), its error and "
              "tapml's reading of it:", "", "| model | target | culprit op | module | local max abs | why |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["verdict"] not in ("ok",) and r["target"] != TOP_DOWN:
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

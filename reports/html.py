"""Run record → one self-contained HTML file (jinja2; CSS, JS and SVG inline)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import jinja2

from tapml.record import Run

from .plots import end_to_end_by_step, error_along_model, error_histogram
from .run import ReportError, load_run

__all__ = ["render_report", "write_report", "render_diff", "write_diff", "diff_records", "fmt"]

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("tapml.reports", "templates"),
                          autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True,
                          lstrip_blocks=True)


def fmt(x) -> str:
    """A number as reports show it: 3 significant digits, blanks for missing values."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, float):
        if x == 0:
            return "0"
        if not math.isfinite(x):
            return str(x)
        return f"{x:.3g}"
    return str(x)


_ENV.filters["num"] = fmt


def _boundaries(record: Run) -> list[tuple[int, str]]:
    groups = [g for s in record.steps for g in s.groups]
    seen, out = set(), []
    for g in dict.fromkeys(groups):
        module = g.split(" ", 1)[1] if g.startswith(("before ", "after ")) else g
        first = next((o.index for o in record.ops if o.module == module
                      or o.module.startswith(module + ".")), None)
        if first is not None and g not in seen and not g.startswith(("before ", "after ")):
            seen.add(g)
            out.append((first, g))
    return out


def _coverage(record: Run) -> tuple[list[dict], list[dict]]:
    by_type: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, list] = defaultdict(list)
    for o in record.ops:
        if o.status == "skipped" and not o.offloaded:
            continue
        state = "offloaded" if o.offloaded else "fell back"
        by_type[o.op][state] += 1
        if o.status in ("unsupported", "crashed", "timeout") or (o.offloaded is False):
            reasons[o.reason or (o.propagated.problem if o.propagated else None) or str(o.status)].append(o)
    rows = [{"op": op, "offloaded": c["offloaded"], "fell_back": c["fell back"]} for op, c in by_type.items()]
    rows.sort(key=lambda r: (-r["fell_back"], r["op"]))
    grouped = [{"reason": r, "count": len(v), "ops": sorted({o.op for o in v})} for r, v in reasons.items()]
    grouped.sort(key=lambda g: -g["count"])
    return rows, grouped


def render_report(record: Run) -> str:
    ops = record.ops
    culprit = record.culprit
    first = record.first_nonfinite
    tol = culprit.local.tolerance if culprit else next((o.tolerance for o in ops if o.tolerance), None)
    plots = {
        "along": error_along_model(ops, _boundaries(record), tol.atol if tol else None,
                                   culprit.index if culprit else None, first.index if first else None),
        "steps": end_to_end_by_step(record.steps) if record.steps else "",
        "histogram": error_histogram(culprit.local.histogram) if culprit and culprit.local.histogram else "",
    }
    coverage, reasons = _coverage(record)
    return _ENV.get_template("report.html.j2").render(
        r=record, ops=ops, culprit=culprit, plots=plots, coverage=coverage, reasons=reasons,
        op_types=sorted({o.op for o in ops}), statuses=[s for s, n in record.counts.items() if n],
    )


def _write(out: str | Path, html: str) -> Path:
    """Write beside the destination, then rename: a failed write leaves no half file."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(html)
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def write_report(run_json: str | Path, out: str | Path) -> Path:
    return _write(out, render_report(load_run(run_json)))


def _key(o) -> tuple:
    return (o.index, o.op, o.module)


def _err(o) -> float | None:
    return o.local.max_abs if o is not None and o.local is not None else None


def diff_records(a: Run, b: Run) -> dict:
    """Ops compared across two runs: worse, better, newly unsupported, newly supported."""
    b_ops = {_key(o): o for o in b.ops}
    rows = []
    for oa in a.ops:
        ob = b_ops.get(_key(oa))
        if ob is None:
            continue
        ea, eb = _err(oa), _err(ob)
        if oa.status != "unsupported" and ob.status == "unsupported":
            change = "newly unsupported"
        elif oa.status == "unsupported" and ob.status != "unsupported":
            change = "newly supported"
        elif oa.status == "ok" and ob.status == "divergent":
            change = "worse"
        elif oa.status == "divergent" and ob.status == "ok":
            change = "better"
        elif ea is not None and eb is not None and eb > 2 * ea and eb > 0:
            change = "worse"
        elif ea is not None and eb is not None and ea > 2 * eb and ea > 0:
            change = "better"
        else:
            change = "same"
        rows.append({"index": oa.index, "op": oa.op, "module": oa.module, "a_status": str(oa.status),
                     "b_status": str(ob.status), "a_err": ea, "b_err": eb, "change": change,
                     "reason": ob.reason if change == "newly unsupported" else ""})
    return {"rows": rows, "counts": Counter(r["change"] for r in rows), "unmatched": len(a.ops) - len(rows)}


def render_diff(a: Run, b: Run, names: tuple[str, str]) -> str:
    d = diff_records(a, b)
    return _ENV.get_template("diff.html.j2").render(a=a, b=b, names=names, d=d)


def write_diff(run_a: str | Path, run_b: str | Path, out: str | Path) -> Path:
    a, b = load_run(run_a), load_run(run_b)
    return _write(out, render_diff(a, b, (str(run_a), str(run_b))))

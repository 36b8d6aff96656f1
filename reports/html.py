"""Run record → one self-contained HTML file (jinja2; CSS, JS and SVG inline), and the notebook card."""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import jinja2
import markupsafe

from tapml.record import OpRow, Run

from .plots import end_to_end_by_step, error_along_model, error_histogram
from .run import ReportError, load_run
from .tree import measured_rows, ops_tree
from .units import LEVELS, unit_error, unit_lines

__all__ = ["render_report", "write_report", "summary_html", "fmt", "human_bytes", "write_text", "ENV"]

ENV = jinja2.Environment(loader=jinja2.PackageLoader("tapml.reports", "templates"),
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


def human_bytes(n: int | float | None) -> str:
    """Bytes as people read them: B, KiB, MiB, GiB."""
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _dots(text: str | None) -> markupsafe.Markup:
    """A dotted name that may wrap after each dot (``encoder.<wbr>layer.<wbr>3``), never mid-word."""
    return markupsafe.Markup(".<wbr>").join((text or "").split("."))


ENV.filters.update(num=fmt, bytes=human_bytes, dots=_dots)
ENV.globals.update(levels=LEVELS, unit_error=unit_error)


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


def is_view(o: OpRow) -> bool:
    """A view op (no compute); records written before the ``view`` field say so in their reason."""
    return bool(o.view) if o.view is not None else (o.reason or "").startswith("view op")


def _plots(record: Run) -> dict[str, str]:
    culprit, first = record.culprit, record.first_nonfinite
    tol = _tolerance(record)
    return {
        "along": error_along_model(record.ops, _boundaries(record), tol.atol if tol else None,
                                   culprit.index if culprit else None, first.index if first else None),
        "steps": end_to_end_by_step(record.steps) if record.steps else "",
        "histogram": error_histogram(culprit.local.histogram) if culprit and culprit.local.histogram else "",
    }


def _tolerance(record: Run):
    c = record.culprit
    return c.local.tolerance if c else next((o.tolerance for o in record.ops if o.tolerance), None)


def _repro_href(record: Run, run_json: str | Path | None, out: str | Path | None) -> str | None:
    """The culprit's repro script as a link from where the report is written."""
    c = record.culprit
    if c is None or not c.repro_dir:
        return None
    script = f"{c.repro_dir}/repro.py"
    if run_json is None or out is None:
        return script
    target = Path(run_json).resolve().parent / script
    return Path(os.path.relpath(target, Path(out).resolve().parent)).as_posix()


def render_report(record: Run, *, repro_href: str | None = None) -> str:
    """The whole report; ``repro_href`` links the culprit's repro script (default: beside run.json)."""
    coverage, reasons = _coverage(record)
    return ENV.get_template("report.html.j2").render(
        r=record, ops=record.ops, culprit=record.culprit, plots=_plots(record), coverage=coverage, reasons=reasons,
        op_types=sorted({o.op for o in record.ops}), statuses=[s for s, n in record.counts.items() if n],
        tree=ops_tree(record.ops), measured=measured_rows(record.ops), is_view=is_view,
        views=sum(1 for o in record.ops if is_view(o)), repro_href=repro_href or _repro_href(record, None, None),
        unit_lines=unit_lines(record),
    )


def summary_html(record: Run) -> str:
    """The report's header, verdict and culprit card alone: how a ``Run`` shows itself in Jupyter."""
    return ENV.get_template("fragment.html.j2").render(r=record, culprit=record.culprit,
                                                        repro_href=_repro_href(record, None, None))


def write_text(out: str | Path, text: str) -> Path:
    """Write beside the destination, then rename: a failed write leaves no half file."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def write_report(run: str | Path | Run, out: str | Path, *, run_json: str | Path | None = None) -> Path:
    """Render ``run`` (a record or its ``run.json``) into ``out``; links resolve from where ``out`` is."""
    if not isinstance(run, Run):
        run_json, run = run, load_run(run)
    return write_text(out, render_report(run, repro_href=_repro_href(run, run_json, out)))

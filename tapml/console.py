"""Terminal rendering for the CLI: summaries, run verdicts, tables and progress (rich).

Results go to stdout, progress and diagnostics to stderr; progress only on a
terminal; ``NO_COLOR`` is honoured.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core import jsonable
from .record import Run

__all__ = ["err", "out", "emit_json", "human_bytes", "progress", "show_store", "show_run", "show_replay",
           "show_platforms", "show_zoo"]

err = Console(stderr=True)


def out() -> Console:
    return Console(no_color="NO_COLOR" in os.environ)


def emit_json(obj) -> None:
    print(json.dumps(jsonable(obj), indent=2))


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _f(x) -> str:
    return x if isinstance(x, str) else f"{x:.3g}"


class _Ticker:
    """A live op counter; every method is a no-op when stderr is not a terminal."""

    def __init__(self, bar=None, task=None):
        self._bar, self._task = bar, task

    def count(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=n)

    def advance(self, *_) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)


@contextlib.contextmanager
def progress(label: str):
    """Progress on stderr only when it is a terminal."""
    if not sys.stderr.isatty():
        yield _Ticker()
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn

    bar = Progress(SpinnerColumn(), TextColumn("{task.description} {task.completed} ops"), console=err,
                   transient=True)
    task = bar.add_task(label, total=None)
    with bar:
        yield _Ticker(bar, task)


def show_store(s: dict, as_json: bool) -> None:
    """A store's summary (``inspection.summarize``)."""
    if as_json:
        emit_json(s)
        return
    o = out()
    o.print(f"[bold]{s['path']}[/]  {s['model'].get('name') or s['model'].get('class', '')}"
            f"  (torch {s['versions']['torch']}, tapml {s['versions']['tapml']})")
    table = Table(show_header=False, box=None)
    rows = [
        ("ops", f"{s['ops']} ({s['compute_ops']} compute, {s['view_ops']} views, "
                f"{s['nondeterministic_ops']} nondeterministic)"),
        ("unique signatures", str(s["unique_signatures"])),
        ("layers (module calls)", str(s["layers"])),
        ("steps", ", ".join(f"{st['name']} ({st['ops']} ops)" for st in s["steps"])),
        ("tensors", f"{s['tensors']} unique, {s['tensor_uses']} uses"),
        ("stored", f"{human_bytes(s['stored_bytes'])} on disk, {human_bytes(s['unique_tensor_bytes'])} "
                   f"unique, {human_bytes(s['referenced_bytes'])} referenced"),
        ("verified", "yes" if s["verified"] else "not checked"),
    ]
    if s["truncated"]:
        rows.append(("truncated", s["truncated"]))
    if "replay" in s:
        r = s["replay"]
        noisy = len(r.get("reference_nondeterministic", []))
        rows.append(("replay", f"{r['checked'] - len(r['mismatches']) - noisy}/{r['checked'] - noisy} bit-exact "
                               f"({r['skipped_nondeterministic']} nondeterministic skipped"
                               + (f", {noisy} where the reference disagrees with itself" if noisy else "") + ")"))
    for k, v in rows:
        table.add_row(f"[cyan]{k}[/]", v)
    o.print(table)
    ops = Table("op", "calls", title="op types")
    for name, n in list(s["op_types"].items())[:15]:
        ops.add_row(name, str(n))
    o.print(ops)
    for m in s.get("replay", {}).get("mismatches", [])[:20]:
        o.print(f"[red]mismatch[/] op {m['index']} {m['op']} in {m['module'] or '(model)'}: {m['reason']}")


def show_run(r: Run, outdir: Path | None, as_json: bool) -> None:
    """An offload's verdict, steps and divergent ops."""
    if as_json:
        brief = {"verdict": r.verdict, "summary": r.summary, "culprit": r.culprit, "counts": r.counts,
                 "coverage": r.coverage, "compute_ops": r.compute_ops, "offloaded_ops": r.offloaded_ops,
                 "first_nonfinite": r.first_nonfinite, "victims": len(r.victims),
                 "steps": [{"name": s.name, "offloaded": s.offloaded, "end_to_end_max_abs": s.end_to_end.max_abs,
                            "ok": s.end_to_end.ok} for s in r.steps]}
        if outdir is not None:
            brief.update(run=str(outdir / "run.json"), report=str(outdir / "report.html"))
        emit_json(brief)
        return
    o = out()
    color = {"ok": "green", "divergent": "red", "incomplete": "yellow"}.get(r.verdict, "yellow")
    o.print(f"[bold {color}]{r.verdict}[/]: {r.summary}")
    table = Table("step", "offloaded", "end-to-end max abs", "ok", "wall", "target", "kernel")
    for s in r.steps:
        t = s.timing
        table.add_row(s.name, str(s.offloaded), _f(s.end_to_end.max_abs), "yes" if s.end_to_end.ok else "[red]no[/]",
                      f"{t.wall_s * 1e3:.0f} ms", f"{t.target_s * 1e3:.0f} ms", f"{t.kernel_s * 1e3:.0f} ms")
    o.print(table)
    o.print("ops: " + ", ".join(f"{n} {k}" for k, n in r.counts.items() if n)
            + f"; coverage {r.coverage:.0%} of {r.compute_ops} compute ops")
    divergent = [x for x in r.ops if x.status == "divergent"]
    if divergent:
        o.print(f"divergent ops ({len(divergent)}):")
        for x in divergent[:10]:
            o.print(f"  {x.index:4d} {x.op} in {x.module or '(model)'}: max abs {_f(x.local.max_abs)}"
                    f" — {x.local.why or ''}")
    if r.first_nonfinite:
        f = r.first_nonfinite
        o.print(f"first NaN/Inf: op {f.index} {f.op} in {f.module or '(model)'} ({f.where})")
    if outdir is not None:
        o.print(f"run record: {outdir / 'run.json'}  report: {outdir / 'report.html'}")


def show_replay(result, as_json: bool) -> None:
    """Local errors of replayed ops (``api.ReplayResult``)."""
    results = result.results
    ran = [r for r in results if r.local is not None]
    if as_json:
        emit_json({"store": result.store, "platform": result.platform, "counts": result.counts,
                   "max_abs_error": max((r.local.max_abs for r in ran), default=None),
                   "ops": [r.to_json() for r in results]})
        return
    o = out()
    counts = Counter(str(r.status) for r in results)
    o.print(f"[bold]{result.platform}[/]: " + ", ".join(f"{n} {k}" for k, n in counts.most_common()))
    table = Table("#", "op", "module", "status", "max abs", "tolerance", "why", title="largest local errors")
    for r in sorted(ran, key=lambda r: -r.local.max_abs)[:12]:
        tol = r.local.tolerance
        table.add_row(str(r.index), r.op, r.module or "(model)", str(r.status), _f(r.local.max_abs),
                      f"{tol.atol:.2g}+{tol.rtol:.2g}·|x|", r.local.why or "")
    o.print(table)
    reasons = Counter(r.reason for r in results if r.status in ("unsupported", "crashed", "timeout"))
    for reason, n in reasons.most_common(8):
        o.print(f"  {n:4d} × {reason}")


def show_platforms(rows: list[dict], as_json: bool) -> None:
    if as_json:
        emit_json(rows)
        return
    table = Table("platform", "available", "device / why not", "description")
    for r in rows:
        where = r["capabilities"]["device"] if r["available"] else r["reason"]
        if r["available"] and r["capabilities"].get("limits"):
            where += "\n" + "\n".join(f"{k}: {v}" for k, v in r["capabilities"]["limits"])
        table.add_row(r["name"], "[green]yes[/]" if r["available"] else "[red]no[/]", where, r["description"])
    out().print(table)


def show_zoo(entries: list[dict], as_json: bool) -> None:
    if as_json:
        emit_json(entries)
        return
    table = Table("spec", "description")
    for e in entries:
        table.add_row(e["spec"], e["description"])
    out().print(table)

"""Terminal rendering for the CLI: summaries, run verdicts, tables and progress (rich).

Results go to stdout, progress and diagnostics to stderr; progress only on a
terminal; ``NO_COLOR`` is honoured. Not on a terminal (CI logs, pipes) every
table row is one plain line and nothing is wrapped or cut; on a narrow terminal
a table too wide for it folds each row's columns under it instead of squeezing
the cells.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .core import jsonable
from .record import Run
from .reports import human_bytes, unit_error

__all__ = ["err", "out", "emit_json", "human_bytes", "progress", "table", "show_store", "show_run", "show_replay",
           "show_platforms", "show_zoo", "show_diff", "show_matrix_row"]

err = Console(stderr=True, soft_wrap=True)
TERMINAL_LIST = 12  # on a terminal, long lists stop here and say how many more (never silently)


def out() -> Console:
    return Console(no_color="NO_COLOR" in os.environ, soft_wrap=True)


def emit_json(obj) -> None:
    print(json.dumps(jsonable(obj), indent=2))


def _f(x) -> str:
    return "" if x is None else x if isinstance(x, str) else f"{x:.3g}"


class _Progress:
    """Progress bars on stderr (``api.Progress`` or an op count); no-ops when stderr is not a terminal."""

    def __init__(self, bar=None, label: str = ""):
        self._bar, self._label, self._task, self._key = bar, label, None, None

    def show(self, p) -> None:
        """One bar per phase (each step, the isolated pass): total, done/total, elapsed and remaining."""
        if self._bar is None:
            return
        key = (p.phase, p.step, p.label)
        if key != self._key:
            if self._task is not None:
                self._bar.remove_task(self._task)
            where = f"step {p.step + 1}/{p.steps} {p.label}" if p.phase == "step" else p.label
            self._task, self._key = self._bar.add_task(where, total=p.total), key
        self._bar.update(self._task, completed=p.done, total=p.total)

    def count(self, n: int) -> None:
        """An op count with no known total (carving)."""
        if self._bar is not None:
            if self._task is None:
                self._task = self._bar.add_task(self._label, total=None)
            self._bar.update(self._task, completed=n)


@contextlib.contextmanager
def progress(label: str) -> Iterator[_Progress]:
    """Progress on stderr only when it is a terminal (CI logs get the results alone)."""
    if not sys.stderr.isatty():
        yield _Progress()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ops"),
                   TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(), console=err, transient=True)
    with bar:
        yield _Progress(bar, label)


def table(headers: list[str], rows: list[list[str]], title: str | None = None, console: Console | None = None,
          right: tuple[int, ...] = ()) -> None:
    """Rows as a table that never cuts a cell: plain aligned lines when not a terminal; on a terminal a
    rich table when it fits, else each row's first column with the others folded beneath it."""
    o = console or out()
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[k]) for r in rows]) for k, h in enumerate(headers)]
    if title:
        o.print(f"[bold]{escape(title)}[/]")
    if not o.is_terminal:
        for line in [headers] + rows:
            o.print("  ".join((c.rjust(w) if k in right else c.ljust(w)) for k, (c, w) in
                              enumerate(zip(line, widths, strict=True))).rstrip(), markup=False, highlight=False)
        return
    if sum(widths) + 3 * len(widths) + 1 <= o.width:
        t = Table(*headers)
        for k, col in enumerate(t.columns):
            col.no_wrap, col.justify = True, ("right" if k in right else "left")
        for r in rows:
            t.add_row(*map(escape, r))
        o.print(t)
        return
    for r in rows:  # folded: nothing cut, nothing wrapped mid-word
        o.print(f"[bold]{escape(r[0])}[/]")
        for h, c in zip(headers[1:], r[1:], strict=True):
            if c:
                o.print(f"    [dim]{escape(h)}:[/] {escape(c)}")


def _listed(o: Console, items: list, show) -> None:
    """Every item when not a terminal; on one, the first ``TERMINAL_LIST`` and how many more."""
    shown = items if not o.is_terminal else items[:TERMINAL_LIST]
    for item in shown:
        show(item)
    if len(shown) < len(items):
        o.print(f"  … and {len(items) - len(shown)} more (all of them in the report and with --json)")


def show_store(s: dict, as_json: bool) -> None:
    """A store's summary (``inspection.summarize``)."""
    if as_json:
        emit_json(s)
        return
    o = out()
    o.print(f"[bold]{escape(s['path'])}[/]  {escape(s['model'].get('name') or s['model'].get('class', ''))}"
            f"  (torch {s['versions']['torch']}, tapml {s['versions']['tapml']})")
    rows = [
        ("reference", f"{s['reference']['name']} on {s['reference']['device']}"),
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
        o.print(f"[cyan]{k}:[/] {escape(v)}")
    table(["op", "calls"], [[name, n] for name, n in s["op_types"].items()], title="op types", console=o,
          right=(1,))
    mismatches = s.get("replay", {}).get("mismatches", [])
    _listed(o, mismatches, lambda m: o.print(f"[red]mismatch[/] op {m['index']} {escape(m['op'])} in "
                                             f"{escape(m['module'] or '(model)')}: {escape(m['reason'])}"))


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.0f} ms"


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
            if r.culprit is not None and r.culprit.repro_dir:
                brief["repro"] = str(outdir / r.culprit.repro_dir / "repro.py")
        emit_json(brief)
        return
    o = out()
    color = {"ok": "green", "divergent": "red", "incomplete": "yellow"}.get(r.verdict, "yellow")
    o.print(f"[bold {color}]{r.verdict}[/]: {escape(r.summary)}")
    table(["step", "offloaded", "end-to-end max abs", "ok", "wall", "kernel", "compile", "transfer + RPC",
           "bytes sent"],
          [[s.name, s.offloaded, _f(s.end_to_end.max_abs), "yes" if s.end_to_end.ok else "no", _ms(s.timing.wall_s),
            _ms(s.timing.kernel_s), _ms(s.timing.compile_s), _ms(s.timing.transfer_and_overhead_s),
            human_bytes(s.bytes_sent)] for s in r.steps], console=o, right=(1, 2, 4, 5, 6, 7, 8))
    o.print("ops: " + ", ".join(f"{n} {k}" for k, n in r.counts.items() if n)
            + f"; coverage {r.coverage:.0%} of {r.compute_ops} compute ops")
    divergent = [x for x in r.ops if x.status == "divergent"]
    if divergent:
        o.print(f"divergent ops ({len(divergent)}):")
        _listed(o, divergent, lambda x: o.print(
            f"  {x.index:4d} {escape(x.op)} in {escape(x.module or '(model)')}: max abs {_f(x.local.max_abs)}"
            f" — {escape(x.local.why or '')}"))
    if r.units:
        _show_units(o, r)
    if r.first_nonfinite:
        f = r.first_nonfinite
        o.print(f"first NaN/Inf: op {f.index} {escape(f.op)} in {escape(f.module or '(model)')} ({f.where})")
    if outdir is not None:
        o.print(f"run record: {outdir / 'run.json'}")
        o.print(f"report: {outdir / 'report.html'}")
        if r.culprit is not None and r.culprit.repro_dir:
            o.print(f"repro: python {outdir / r.culprit.repro_dir / 'repro.py'}")


def _show_units(o: Console, r: Run) -> None:
    """A top-down run's units (the compiled ones, those that fell back or failed, and those checked while
    localizing) and the descent that found the culprit."""
    rows = [u for u in r.units if u.status != "not a unit" or u.parent is None]
    shown = rows if not o.is_terminal else rows[:TERMINAL_LIST]
    compiled = sum(1 for u in r.units if u.status == "compiled")
    table(["unit", "class", "status", "local", "propagated", "run", "reason"],
          [[u.module or "(model)", u.cls, u.status, unit_error(u.local, r.rule), unit_error(u.propagated, r.rule),
            "" if u.run_ms is None else f"{u.run_ms:.3g} ms", u.reason or ""] for u in shown],
          title=f"units: {compiled} compiled of {len(r.units)} module calls considered", console=o, right=(3, 4, 5))
    if len(shown) < len(rows):
        o.print(f"  … and {len(rows) - len(shown)} more units (all of them in the report and run.json)")
    c = r.culprit
    if c is not None and c.descent:
        where = f" (fused kernel {c.kernel}: {', '.join(c.covers) or 'no carved op matched'})" if c.kernel else ""
        o.print(f"descent to the culprit, level {c.level}{escape(where)}:")
        for k, step in enumerate(c.descent):
            o.print(f"  {'  ' * k}{'→ ' if k else ''}{escape(step)}")


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
    o.print(f"[bold]{escape(result.platform)}[/]: " + ", ".join(f"{n} {k}" for k, n in counts.most_common()))
    worst = sorted(ran, key=lambda r: -r.local.max_abs)[:12]
    table(["#", "op", "module", "status", "max abs", "tolerance", "why"],
          [[r.index, r.op, r.module or "(model)", r.status, _f(r.local.max_abs),
            f"{r.local.tolerance.atol:.2g}+{r.local.tolerance.rtol:.2g}·|x|", r.local.why or ""] for r in worst],
          title=f"largest local errors ({len(worst)} of {len(ran)} measured)", console=o, right=(0, 4))
    reasons = Counter(r.reason for r in results if r.status in ("unsupported", "crashed", "timeout"))
    _listed(o, reasons.most_common(), lambda kv: o.print(f"  {kv[1]:4d} × {escape(kv[0] or '')}"))


def show_diff(result, as_json: bool) -> None:
    """Two runs compared (``api.DiffResult``): counts on one line, per-op rows with --json."""
    if as_json:
        emit_json(result.to_json())
        return
    o = out()
    o.print(f"{result.path}: " + ", ".join(f"{n} {k}" for k, n in sorted(result.counts.items())))
    changed = [r for r in result.rows if r["change"] != "same"]
    shown = changed if not o.is_terminal else changed[:TERMINAL_LIST]
    if changed:
        table(["#", "op", "module", "change", "A local", "B local"],
              [[r["index"], r["op"], r["module"] or "(model)", r["change"], _f(r["a_err"]), _f(r["b_err"])]
               for r in shown], console=o, right=(0, 4, 5))
    if len(shown) < len(changed):
        o.print(f"  … and {len(changed) - len(shown)} more changed ops (all of them in {result.path} and with --json)")


def show_platforms(rows: list[dict], as_json: bool) -> None:
    if as_json:
        emit_json(rows)
        return
    table(["platform", "available", "device / why not", "description"],
          [[r["name"], "yes" if r["available"] else "no",
            (r["capabilities"]["device"] if r["available"] else r["reason"])
            + "".join(f"; {k}: {v}" for k, v in (r.get("capabilities", {}).get("limits") or [])),
            r["description"]] for r in rows])


def show_zoo(entries: list[dict], as_json: bool) -> None:
    if as_json:
        emit_json(entries)
        return
    table(["spec", "description"], [[e["spec"], e["description"]] for e in entries])


def show_matrix_row(r: dict) -> None:
    err.print(f"{r['model']:18s} {r['target']:10s} {r['verdict']:10s} {r['offload_s']:6.1f}s", markup=False,
              highlight=False)

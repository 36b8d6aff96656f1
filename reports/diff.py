"""Two run records compared op by op (two compilers, two targets): the rows, and their HTML page."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tapml.record import OpRow, Run

from .html import ENV, is_view, write_text
from .plots import errors_overlaid
from .tree import measured_rows

__all__ = ["diff_records", "render_diff", "write_diff"]


def _key(o: OpRow) -> tuple:
    return (o.index, o.op, o.module)


def _local(o: OpRow, measured: dict[int, OpRow]) -> float | None:
    """The op's local max abs error, or its signature's (measured on an earlier call)."""
    row = o if o.local is not None else measured.get(o.index)
    return row.local.max_abs if row is not None and row.local is not None else None


def _change(oa: OpRow, ob: OpRow, ea, eb) -> str:
    if oa.status != "unsupported" and ob.status == "unsupported":
        return "newly unsupported"
    if oa.status == "unsupported" and ob.status != "unsupported":
        return "newly supported"
    if oa.status == "ok" and ob.status == "divergent":
        return "worse"
    if oa.status == "divergent" and ob.status == "ok":
        return "better"
    if isinstance(ea, float) and isinstance(eb, float):
        if eb > 2 * ea and eb > 0:
            return "worse"
        if ea > 2 * eb and ea > 0:
            return "better"
    return "same"


def diff_records(a: Run, b: Run) -> dict:
    """Ops compared across two runs: worse, better, newly unsupported, newly supported, the same."""
    b_ops = {_key(o): o for o in b.ops}
    ma, mb = measured_rows(a.ops), measured_rows(b.ops)
    rows = []
    for oa in a.ops:
        ob = b_ops.get(_key(oa))
        if ob is None:
            continue
        ea, eb = _local(oa, ma), _local(ob, mb)
        change = _change(oa, ob, ea, eb)
        rows.append({"index": oa.index, "op": oa.op, "module": oa.module, "call": oa.call, "view": is_view(oa),
                     "a_status": str(oa.status), "b_status": str(ob.status), "a_err": ea, "b_err": eb,
                     "a_propagated": oa.propagated.max_abs if oa.propagated else None,
                     "b_propagated": ob.propagated.max_abs if ob.propagated else None, "change": change,
                     "reason": ob.reason if change == "newly unsupported" else ""})
    return {"rows": rows, "counts": Counter(r["change"] for r in rows), "unmatched": len(a.ops) - len(rows)}


def render_diff(a: Run, b: Run, names: tuple[str, str]) -> str:
    d = diff_records(a, b)
    tol = next((o.tolerance for o in a.ops if o.tolerance), None)
    labels = (f"A ({a.target['name']})", f"B ({b.target['name']})")
    plot = errors_overlaid([(labels[0], a.ops), (labels[1], b.ops)], tol.atol if tol else None)
    return ENV.get_template("diff.html.j2").render(a=a, b=b, names=names, d=d, plot=plot,
                                                    changes=["worse", "newly unsupported", "better",
                                                             "newly supported", "same"],
                                                    op_types=sorted({r["op"] for r in d["rows"]}))


def write_diff(a: Run | str | Path, b: Run | str | Path, out: str | Path,
               names: tuple[str, str] | None = None) -> Path:
    from .run import load_run

    names = names or (str(a), str(b))
    a = a if isinstance(a, Run) else load_run(a)
    b = b if isinstance(b, Run) else load_run(b)
    return write_text(out, render_diff(a, b, names))

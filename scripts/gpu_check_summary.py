"""scripts/gpu-check's summary: every replay and offload record of a work folder, and the attention table, as markdown.

    python scripts/gpu_check_summary.py WORK > summary.md   (also writes WORK/summary.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _worst_ratio(ops: list[dict]) -> float | None:
    ratios = [o["local"]["bound"]["ratio"] for o in ops if (o.get("local") or {}).get("bound")]
    return max(ratios, default=None)


def _precisions(ops: list[dict]) -> str:
    names = sorted({o["local"]["bound"].get("precision") for o in ops
                    if (o.get("local") or {}).get("bound") and o["local"]["bound"].get("precision")})
    return ", ".join(names) or "—"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rows(work: Path) -> list[dict]:
    """One row per replay-*.json / offload-*/run.json (named CHECK-WORKLOAD-PLATFORM by the script)."""
    out = []
    names = [p.stem for p in sorted(work.glob("replay-*.err"))] + [p.stem for p in sorted(work.glob("offload-*.err"))]
    for name in names:  # every step leaves NAME.err, with or without a record
        kind, _, rest = name.partition("-")
        path = work / (f"{name}.json" if kind == "replay" else f"{name}/run.json")
        record = _read(path)
        row = {"check": kind, "run": rest, "file": str(path.relative_to(work))}
        if record is None:
            row.update(verdict="error", note=(work / f"{name}.err").read_text().strip()[-300:] or "no record written")
        elif kind == "replay":
            bad = record["counts"].get("divergent", 0)
            row.update(verdict="divergent" if bad else "ok", counts=record["counts"],
                       worst_bound_ratio=_worst_ratio(record["ops"]), precision=_precisions(record["ops"]))
        else:
            row.update(verdict=record["verdict"], counts=record["counts"], reference=record["reference"],
                       worst_bound_ratio=_worst_ratio(record["ops"]), precision=_precisions(record["ops"]),
                       findings=[f["message"] for f in record.get("findings", []) if f["kind"] in
                                 ("precision", "reference-difference")], summary=record["summary"])
        out.append(row)
    return out


def markdown(work: Path, table: list[dict]) -> str:
    env = (work / "env.txt").read_text().strip() if (work / "env.txt").exists() else ""
    lines = ["# gpu-check", "", "```", env, "```", "",
             "| check | workload / platform | verdict | ok | divergent | unsupported | worst error / bound | "
             "consistent with | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        c = {k: r["counts"].get(k, 0) for k in ("ok", "divergent", "unsupported")} if "counts" in r else {}
        ratio = r.get("worst_bound_ratio")
        note = "; ".join(r.get("findings", [])) or r.get("note", "")
        lines.append(f"| {r['check']} | {r['run']} | {r['verdict']} | {c.get('ok', '')} | {c.get('divergent', '')} | "
                     f"{c.get('unsupported', '')} | {'' if ratio is None else f'{ratio:.3g}'} | "
                     f"{r.get('precision', '')} | {note[:300]} |")
    attention = work / "attention" / "attention.md"
    if attention.exists():
        lines += ["", "## SDPA backends (every carved attention call, against the CPU reference and float64)", "",
                  attention.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    work = Path(argv[1])
    table = rows(work)
    (work / "summary.json").write_text(json.dumps(table, indent=1))
    sys.stdout.write(markdown(work, table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

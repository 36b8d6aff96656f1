"""Localization quality: does the verdict rule flag real bugs at the right op and leave harmless
numerical differences alone?

Why: tapml's value is naming the op that *causes* a divergence. A rule that is too strict blames
correct compilers (another summation order, wider accumulation); one that is too loose misses a
bf16 matmul or a mask off by one. This runs every fault platform of ``benchmarks/faults.py`` —
legitimate deviations (touching every op of their family) and bugs (one op call each) — through
``tapml.api.offload`` on trained MiniLM and tiny-llama and scores each run:

- bug: ``exact`` when the verdict is divergent and the culprit is the injected op (same carved
  index, hence same op, module and call); ``other culprit``; ``no culprit`` (divergent only end to
  end); ``missed`` (not divergent). True-positive rate = exact / bugs.
- legitimate: a false positive when the verdict is divergent or any op has status divergent.

It also measures each fault on the carved (reference) inputs of every op it touches: max abs
error, the output's magnitude, and how far the reference and the fault are from float64 — the
numbers a bound has to separate.

Usage: python benchmarks/localization.py [--rule tolerance|oracle|bound] [--plan all|layers|single|ops]
                                         [--only GLOB] [--kind bug|legit] [--background LegitClass]
                                         [--json out.json]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import tapml.api
from tapml.core import OpCall, TapmlError, bind_args
from tapml.settings import Settings

FAULTS = Path(__file__).resolve().with_name("faults.py")
sys.path.insert(0, str(FAULTS.parent))
import faults  # noqa: E402 — the sibling file (offload loads it again, by path, as a platform)
from faults import BUGS, LEGIT  # noqa: E402

WORKLOADS = {"minilm": "zoo:minilm", "llama": "zoo:tiny-llama"}


@dataclass(frozen=True)
class Case:
    fault: str  # class in faults.py
    workload: str  # key of WORKLOADS

    @property
    def name(self) -> str:
        return f"{self.fault}@{self.workload}"


CASES = [
    Case("BlockedMatmul", "minilm"), Case("BlockedMatmul", "llama"),
    Case("UnfusedBias", "minilm"),
    Case("WideAccumulate", "minilm"), Case("WideAccumulate", "llama"),
    Case("SequentialSum", "minilm"), Case("SequentialSum", "llama"),
    Case("KahanSum", "minilm"), Case("KahanSum", "llama"),
    Case("Softmax64", "minilm"), Case("Softmax64", "llama"),
    Case("TwoPassLayerNorm", "minilm"),
    Case("UlpElementwise", "minilm"), Case("UlpElementwise", "llama"),
    Case("BF16Matmul", "minilm"),
    Case("DropLastK", "llama"),
    Case("ExpSoftmax", "minilm"),
    Case("ExpSilu", "llama"),
    Case("LayerNormEps", "minilm"),
    Case("MaskLate", "llama"),
    Case("ScaledElement", "minilm"),
    Case("GeluTanh", "minilm"),
    Case("FastRsqrt", "llama"),
]
assert {c.fault for c in CASES} == set(LEGIT) | set(BUGS)


@dataclass
class Measure:
    """The fault on the reference inputs of the ops it touches (every call), worst op by max abs error."""

    ops_touched: int = 0
    ops_changed: int = 0  # touched ops whose output differs from the reference at all
    worst_index: int | None = None
    worst_site: str = ""
    max_abs: float = 0.0
    ref_max: float = 0.0  # max |reference output| of the worst op
    ref_rms: float = 0.0
    ref_vs_fp64: float | None = None  # max abs (reference - float64) of the worst op
    fault_vs_fp64: float | None = None


@dataclass
class Result:
    case: str
    fault: str
    kind: str
    workload: str
    what: str
    expected: dict | None = None  # bugs: index, op, module, call, first_of_signature
    verdict: str = ""
    culprit: dict | None = None
    divergent_ops: int = 0
    end_to_end_ok: bool | None = None
    end_to_end_max_abs: float | None = None
    site: dict | None = None  # bugs: what the run recorded for the injected op
    outcome: str = ""
    seconds: float = 0.0
    measure: Measure = field(default_factory=Measure)
    error: str | None = None


def _diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference, equal infinities counting as 0 and a NaN or inf mismatch as inf."""
    if not want.is_floating_point():
        return 0.0 if torch.equal(got, want) else math.inf
    d = (got.double() - want.double()).abs()
    d = torch.where(got.double() == want.double(), torch.zeros_like(d), d)
    both_nan = got.isnan() & want.isnan()
    d = torch.where(both_nan, torch.zeros_like(d), d).nan_to_num(math.inf, math.inf)
    return float(d.max()) if d.numel() else 0.0


def _fp64(op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The op on float64 copies of its float inputs (the truth a rounding analysis compares with)."""
    try:
        args, kwargs = bind_args(op, [t.double() if t.is_floating_point() else t for t in inputs])
        with torch.no_grad():
            out = op.func(*args, **kwargs)
        return list(out) if isinstance(out, (tuple, list)) else [out]
    except Exception:
        return None


def measure(store: Any, fault: Any) -> tuple[Measure, list[int]]:
    """Run the fault (through the plugin interface) on every op it hits, with the carved inputs;
    the hit indices too."""
    m, hits = Measure(), []
    worst = -1.0
    for rec in store.ops:
        if rec["view"] or rec["nondeterministic"]:
            continue
        op = store.op_call(rec["index"])
        if not fault.hit(op):
            continue
        hits.append(rec["index"])
        inputs, want = store.inputs(rec["index"]), store.outputs(rec["index"])
        got = fault.run(fault.compile(op), op, inputs)
        err = max(_diff(g, w) for g, w in zip(got, want, strict=True))
        m.ops_touched += 1
        m.ops_changed += err > 0
        if err > worst:
            worst = err
            ref = want[0].double()
            finite = ref[ref.isfinite()]
            exact = _fp64(op, inputs)
            m.worst_index, m.worst_site = rec["index"], f"{rec['op'].removeprefix('aten.')} @ {rec['module']}"
            m.max_abs = err
            m.ref_max = float(finite.abs().max()) if finite.numel() else 0.0
            m.ref_rms = float(finite.pow(2).mean().sqrt()) if finite.numel() else 0.0
            m.ref_vs_fp64 = _diff(want[0].double(), exact[0].double()) if exact else None
            m.fault_vs_fp64 = _diff(got[0].double(), exact[0].double()) if exact else None
    return m, hits


def classify(result: Result, run: Any) -> None:
    """Fill verdict, culprit and outcome from the run record."""
    result.verdict = str(run.verdict)
    c = run.culprit
    if c is not None:
        result.culprit = {"index": c.index, "op": c.op, "module": c.module, "call": c.call}
    result.divergent_ops = sum(1 for o in run.ops if str(o.status) == "divergent")
    result.end_to_end_ok = bool(run.end_to_end.ok)
    result.end_to_end_max_abs = max((float(s.end_to_end.max_abs) for s in run.steps), default=None)
    if result.expected:
        row = next(o for o in run.ops if o.index == result.expected["index"])
        oracle = row.local.oracle if row.local is not None else None
        result.site = {"status": str(row.status),
                       "local_max_abs": None if row.local is None else float(row.local.max_abs),
                       "oracle_ratio": None if oracle is None else float(oracle.ratio),
                       "propagated_max_abs": None if row.propagated is None else float(row.propagated.max_abs),
                       "propagated_ok": None if row.propagated is None else bool(row.propagated.ok)}
    divergent = result.verdict == "divergent"
    if result.kind == "bug":
        if not divergent:
            result.outcome = "incomplete" if result.verdict == "incomplete" else "missed"
        elif c is None:
            result.outcome = "no culprit"
        elif result.expected and c.index == result.expected["index"]:
            result.outcome = "exact"
        else:
            result.outcome = "other culprit"
    elif divergent or result.divergent_ops:
        where = "end to end" if c is None else f"{result.divergent_ops} ops"
        result.outcome = f"FALSE POSITIVE ({where})"
    else:
        result.outcome = "ok"


def site(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['op'].removeprefix('aten.')} @ {d['module'] or '(model)'} #{d['call']} [{d['index']}]"


def run_case(case: Case, store: Any, args: argparse.Namespace) -> Result:
    spec = f"{FAULTS}:{case.fault}"
    settings = Settings(platform=spec, in_process=True, rule=args.rule)
    fault = getattr(faults, case.fault)()
    result = Result(case.name, case.fault, fault.kind, case.workload, fault.what)
    result.measure, hits = measure(store, fault)
    if fault.kind == "bug":
        if len(hits) != 1:
            result.error = f"the bug hits {len(hits)} carved ops, not exactly one: {hits}"
            result.outcome = "harness error"
            return result
        rec = store.ops[hits[0]]
        first = next(r["index"] for r in store.ops if r["signature"] == rec["signature"])
        result.expected = {"index": rec["index"], "op": rec["op"], "module": rec["module"], "call": rec["call"],
                           "first_of_signature": first == rec["index"]}
    elif not hits:
        result.outcome = "n/a (no such op)"
        return result
    start = time.perf_counter()
    try:
        run = tapml.api.offload(WORKLOADS[case.workload], settings=settings, store=store, plan=args.plan)
    except TapmlError as e:
        result.error, result.outcome = str(e), "tapml error"
    else:
        classify(result, run)
    result.seconds = time.perf_counter() - start
    return result


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def note(r: Result) -> str:
    """Why an outcome is what it is: the injected op's record, or the end-to-end error."""
    parts = []
    if r.site:
        s = r.site
        if s["local_max_abs"] is None:
            parts.append(f"site not run alone (propagated {_g(s['propagated_max_abs'])}, "
                         f"{'within' if s['propagated_ok'] else 'out of'} tolerance)")
        else:
            parts.append(f"site {s['status']}: local {_g(s['local_max_abs'])}"
                         + (f", fp64 ratio {_g(s['oracle_ratio'])}" if s["oracle_ratio"] is not None else ""))
    if r.end_to_end_ok is False:
        parts.append(f"end-to-end {_g(r.end_to_end_max_abs)}")
    return "; ".join(parts)


def tables(results: list[Result], args: argparse.Namespace) -> str:
    lines = [f"rule `{args.rule}`, plan `{args.plan}`"
             + (f", background `{args.background}` under every bug" if args.background else ""), "",
             "| fault | kind | workload | expected site | verdict | culprit | outcome | s | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        exp = site(r.expected) + ("" if not r.expected else
                                  " (1st of sig.)" if r.expected["first_of_signature"] else " (later call)")
        lines.append(f"| {r.fault} | {r.kind} | {r.workload} | {exp} | {r.verdict or '-'} | {site(r.culprit)} | "
                     f"{r.outcome}{': ' + r.error if r.error else ''} | {r.seconds:.1f} | {note(r)} |")
    bugs = [r for r in results if r.kind == "bug" and r.verdict]
    legit = [r for r in results if r.kind == "legit" and r.verdict]
    detected = [r for r in bugs if r.verdict == "divergent"]
    exact = [r for r in bugs if r.outcome == "exact"]
    fps = [r for r in legit if r.outcome.startswith("FALSE")]

    def rate(a: int, b: int) -> str:
        return f"{a}/{b} = {a / b:.0%}" if b else "-"

    lines += ["", f"- true-positive rate (divergent and exact culprit): {rate(len(exact), len(bugs))}",
              f"- detection rate (divergent at all): {rate(len(detected), len(bugs))}",
              f"- exact-culprit rate among detected: {rate(len(exact), len(detected))}",
              f"- false-positive rate: {rate(len(fps), len(legit))}",
              f"- wall time of the offloads: {sum(r.seconds for r in results):.0f} s", "",
              "| fault | workload | ops touched / changed | worst op | max abs err | max abs ref | rms ref "
              "| ref−fp64 | fault−fp64 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.measure
        lines.append(f"| {r.fault} | {r.workload} | {m.ops_touched} / {m.ops_changed} | "
                     f"{m.worst_site} [{m.worst_index}] | {_g(m.max_abs)} | {_g(m.ref_max)} | {_g(m.ref_rms)} | "
                     f"{_g(m.ref_vs_fp64)} | {_g(m.fault_vs_fp64)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rule", default="tolerance", choices=("tolerance", "oracle", "bound"))
    parser.add_argument("--plan", default="all", choices=("all", "layers", "single", "ops"))
    parser.add_argument("--only", default="*", help="glob on FAULT@WORKLOAD, e.g. 'Blocked*' or '*@llama'")
    parser.add_argument("--kind", choices=("bug", "legit"), help="run only the bugs or only the legitimate faults")
    parser.add_argument("--background", choices=LEGIT, help="also apply this legitimate deviation under each bug")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    try:
        Settings(platform="torch-cpu", rule=args.rule)
    except TapmlError as e:
        print(f"Settings rejects --rule {args.rule}: {e}", file=sys.stderr)
        return 2
    if args.background:
        os.environ["TAPML_FAULT_BACKGROUND"] = args.background
    cases = [c for c in CASES if (fnmatch.fnmatchcase(c.name, args.only) or fnmatch.fnmatchcase(c.fault, args.only))
             and (args.kind is None or (c.fault in BUGS) == (args.kind == "bug"))]
    if not cases:
        print(f"no case matches {args.only!r}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    wall = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="tapml-localization-") as tmp:
        stores = {w: tapml.api.carve(WORKLOADS[w], out=Path(tmp) / w) for w in sorted({c.workload for c in cases})}
        for case in cases:
            r = run_case(case, stores[case.workload], args)
            print(f"{case.name}: {r.outcome} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
            results.append(r)
    wall = time.perf_counter() - wall
    print(tables(results, args))
    print(f"\ntotal wall time {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rule": args.rule, "plan": args.plan, "background": args.background,
                                               "wall_s": wall, "results": [asdict(r) for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

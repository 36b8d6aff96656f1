"""Localization: the isolated pass, the culprit, its victims, and the random-input check.

The isolated pass runs carved ops on the target with the *reference* inputs
from the store, so an op's error there (its *local* error) is its own. The
*culprit* is the first op in execution order whose local error is out of
tolerance; a *victim* has a fine local error but a bad *propagated* one (its
inputs already came from the target).
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch

from tapml.carving import FixtureStore, Graph
from tapml.core import OpFailed, OpRefused, Status, TapmlError, only_tensors, op_info_by_name, to_json
from tapml.judging import Judge
from tapml.platforms import Target, Unsupported
from tapml.record import Candidate, Finding, Metrics, RandomCheck, RandomDraw

from .heap import HeapTrimmer
from .reference import Reference
from .vouch import carved_for

__all__ = ["LocalResult", "Localization", "localize", "local_pass", "run_local", "select_ops", "find_culprit",
           "find_victims", "random_input_check", "skip_reason", "reference_noise", "DRAWS"]


@dataclass
class LocalResult:
    """One op run alone on the target with the reference's inputs."""

    index: int
    op: str
    module: str
    status: Status
    reason: str | None = None
    local: Metrics | None = None
    reference_noise: float | None = None
    outputs: list[torch.Tensor] = field(default_factory=list, repr=False)  # the target's tensors, when kept
    lost: bool = False  # the failure took the target away for the rest of the run

    def to_json(self) -> dict:
        return {k: v for k, v in to_json(replace(self, outputs=[])).items() if k != "outputs"}


def skip_reason(rec: dict) -> str | None:
    """Why an op is never sent to a target (it stays on the reference by design); None for a compute op."""
    if rec["nondeterministic"]:
        return "nondeterministic on the reference (random or uninitialized output): not comparable"
    if rec["view"]:
        return "view op (no compute): stays on the reference"
    if not only_tensors(rec["outputs"]):
        return "returns a Python value, not tensors: stays on the reference"
    try:
        info = op_info_by_name(rec["op"], rec.get("library") or "")
    except OpRefused as e:
        return f"refused: {e}"
    if info.inplace_view:
        return "rewrites tensor metadata in place (squeeze_, resize_, ...): stays on the reference"
    if info.writes_unreturned:
        return "writes inputs it does not return (e.g. batch norm's running statistics): stays on the reference"
    return None


_HEAP = HeapTrimmer()  # one count for every op replayed alone in this process


def run_local(store: FixtureStore, target: Target, judge: Judge, index: int, *, keep_outputs: bool = False,
              reference: Reference | None = None) -> LocalResult:
    """One op on the target with the reference inputs: status and local metrics."""
    rec = store.ops[index]
    here = (index, rec["op"], rec["module"])
    why = skip_reason(rec)
    if why:
        result = LocalResult(*here, Status.SKIPPED, why)
        if rec["nondeterministic"] and not rec["view"] and reference is not None:
            try:  # show the reference's own noise rather than blame the target
                result.reference_noise = reference_noise(store, index, reference)
            except (Unsupported, OpFailed, TapmlError):
                pass
        return result
    try:
        op = store.op_call(index)
    except OpRefused as e:  # an op of a library this machine will not import: it stays on the reference
        return LocalResult(*here, Status.UNSUPPORTED, f"refused: {e}")
    try:
        support = target.prepare(op)
        if not support:
            raise Unsupported(support.reason)
        # a target that copies its inputs into another process, on an op that writes none, may read the live
        # model's weights themselves (the judge only reads them too): no second copy of a 125 MiB weight
        writes = op_info_by_name(rec["op"], rec.get("library") or "").mutated
        inputs = store.inputs(index, shared=target.copies_inputs and not writes)
        got = target.execute(op, inputs)
    except Unsupported as e:
        return LocalResult(*here, Status.UNSUPPORTED, e.reason)
    except OpFailed as e:
        return LocalResult(*here, e.status, f"{type(e).__name__}: {e}", lost=e.fatal)
    want = carved_for(store, index, got, target)
    live = [store.graph.live(index, k) for k in range(len(want))]
    metrics = judge.judge(op, got, want, inputs, live=live)
    del inputs
    _HEAP.moved(store.op_bytes(index))  # every caller's ops: the pass, the suspects, the culprit's neighbours
    return LocalResult(*here, Status.OK if metrics.ok else Status.DIVERGENT, local=metrics,
                       outputs=got if keep_outputs else [])


def select_ops(store: FixtureStore, *, all_calls: bool = False, only: str | None = None) -> list[int]:
    """The ops an isolated pass (or a carved test suite) covers: the first call of each
    signature, or every call; ``only`` is a glob on the overload name."""
    seen: set[str] = set()
    indices = []
    for rec in store.ops:
        if only and not fnmatch.fnmatchcase(rec["op"], only):
            continue
        if all_calls or rec["signature"] not in seen:
            indices.append(rec["index"])
            seen.add(rec["signature"])
    return indices


def local_pass(store: FixtureStore, target: Target, judge: Judge, *, indices: Iterable[int] | None = None,
               all_calls: bool = False, on_result: Callable[[LocalResult], None] | None = None,
               reference: Reference | None = None) -> dict[int, LocalResult]:
    """The isolated pass over ``indices`` (default: every op, or the first call of each
    signature unless ``all_calls``). Returns results by op index."""
    if indices is None:
        indices = select_ops(store, all_calls=all_calls)
    results = {}
    store.forget_uses()  # the carved outputs the live runs read again: this pass reads each op's once
    _HEAP.trim()  # what the live runs freed (at 1.1B: ~90 MiB of heap) is not this pass's to hold
    for i in indices:
        if target.lost is not None:  # nothing can run any more: say so instead of trying each op
            rec = store.ops[i]
            results[i] = LocalResult(i, rec["op"], rec["module"], Status.SKIPPED, f"not run: {target.lost}")
        else:
            results[i] = run_local(store, target, judge, i, reference=reference)
        if on_result is not None:
            on_result(results[i])
    return results


def find_culprit(results: dict[int, LocalResult]) -> LocalResult | None:
    """The first op in execution order out of bounds on its own (before data flow and impact are known)."""
    return next((results[i] for i in sorted(results) if results[i].status == Status.DIVERGENT), None)


def find_victims(culprit: int, graph: Graph, results: dict[int, LocalResult], propagated: dict[int, Metrics],
                 offloaded_with: dict[int, set[int]] | None = None) -> list[int]:
    """Ops the culprit's outputs reach (data-flow edges) whose own kernel is fine but whose chained
    output is out of tolerance — in a step where the culprit itself ran on the target."""
    down = graph.downstream(culprit) if graph.known else {i for i in propagated if i > culprit}
    victims = []
    for v in sorted(down):
        local = results.get(v)
        if v not in propagated or propagated[v].ok or (local is not None and local.status != Status.OK):
            continue
        if offloaded_with is not None and culprit not in offloaded_with.get(v, set()):
            continue  # the culprit was on the reference when this op's error was measured: not its doing
        victims.append(v)
    return victims


def reference_noise(store: FixtureStore, index: int, reference: Reference) -> float:
    """Max abs difference between two reference runs of one op (0.0 for a deterministic op)."""
    op = store.op_call(index)
    a = reference.target.execute(op, store.inputs(index))
    b = reference.target.execute(op, store.inputs(index))
    return max((float((x.double() - y.double()).abs().nan_to_num(0.0).max()) if x.numel() else 0.0)
               for x, y in zip(a, b, strict=True)) if a else 0.0


DRAWS = {
    "normal(0,1)": lambda shape, g: torch.randn(shape, generator=g),
    "uniform(0,1)": lambda shape, g: torch.rand(shape, generator=g),
    "uniform(-1,1)": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1,
}


def random_input_check(store: FixtureStore, target: Target, judge: Judge, index: int,
                       reference: Reference) -> RandomCheck:
    """Would random inputs of the same shapes have revealed this op's fault?

    Float inputs are drawn from common distributions; integer and bool inputs
    (indices, masks) keep their recorded values so the op stays valid.
    """
    op = store.op_call(index)
    recorded = store.inputs(index)
    g = torch.Generator().manual_seed(0)
    draws = []
    for name, draw in DRAWS.items():
        inputs = [draw(t.shape, g).to(t.dtype) if t.is_floating_point() else t for t in recorded]
        try:
            want = reference.target.execute(op, inputs)
            got = target.execute(op, inputs)
            m = judge.judge(op, got, want)
            draws.append(RandomDraw(name, m.ok, max_abs=m.max_abs))
        except (Unsupported, OpFailed, RuntimeError) as e:
            draws.append(RandomDraw(name, False, error=f"{type(e).__name__}: {e}"))
    revealed = any(not d.ok for d in draws)
    return RandomCheck(draws, revealed, "random inputs also reveal it" if revealed else
                       "random inputs would have missed it: only the realistic (carved) inputs reveal the fault")


@dataclass
class Localization:
    """What the isolated pass found: every measured op, the culprit, its victims, the findings."""

    results: dict[int, LocalResult]
    isolated: dict[str, int]  # status counts of the isolated pass proper (for the pytest plugin's parity)
    culprit: LocalResult | None = None
    victims: list[int] = field(default_factory=list)
    random_inputs: RandomCheck | None = None
    noise: dict[int, float] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    explains: str | None = None
    nondeterministic: bool | None = None
    findings: list[Finding] = field(default_factory=list)


def localize(store: FixtureStore, target: Target, judge: Judge, propagated: dict[int, Metrics], *,
             reference: Reference, all_calls: bool = False, check_reference: bool = False,
             on_result: Callable[[LocalResult], None] | None = None, offloaded_with: dict[int, set[int]] | None = None,
             impact: Callable[[list[int]], float] | None = None, suspects: set[int] | None = None) -> Localization:
    """The isolated pass — every unique signature, plus every call whose chained output went wrong —
    then the culprit (out of bounds, reaching the model's output, ranked by impact when several), its
    victims along data-flow edges, and the findings that do not decide the verdict."""
    results = local_pass(store, target, judge, all_calls=all_calls, on_result=on_result, reference=reference)
    isolated = dict(Counter(str(r.status) for r in results.values()))
    for i in sorted(propagated):
        if i not in results and not propagated[i].ok and target.lost is None:
            results[i] = run_local(store, target, judge, i, reference=reference)
    loc = Localization(results, isolated)
    loc.culprit, loc.candidates, loc.explains = _rank(store, results, judge, impact)
    if loc.culprit is None and suspects and target.lost is None:
        # the output went out of bounds, but no op measured so far explains it: every call that ran on the
        # target in that step, alone (a fault in one call of a signature whose chained error stayed small)
        for i in sorted(suspects - set(results)):
            results[i] = run_local(store, target, judge, i, reference=reference)
            if on_result is not None:
                on_result(results[i])
        loc.culprit, loc.candidates, loc.explains = _rank(store, results, judge, impact)
    loc.findings = _findings(store, results)
    if loc.culprit is not None:
        loc.victims = find_victims(loc.culprit.index, store.graph, results, propagated, offloaded_with)
        if target.lost is None:
            loc.random_inputs = random_input_check(store, target, judge, loc.culprit.index, reference)
            loc.nondeterministic = _twice_differs(store, target, loc.culprit.index)
            if loc.nondeterministic:
                loc.findings.append(Finding("nondeterministic-target", "warning",
                                            "the target gave two different answers for the same call of the culprit",
                                            loc.culprit.index, loc.culprit.op, loc.culprit.module))
    if check_reference:
        loc.noise = {i: reference_noise(store, i, reference) for i, r in results.items()
                     if r.status in (Status.OK, Status.DIVERGENT)}
    return loc


def _findings(store: FixtureStore, results: dict[int, LocalResult]) -> list[Finding]:
    """Wrong values that cannot explain the model's output: dead outputs, ops that reach no output."""
    out = []
    for r in sorted(results.values(), key=lambda r: r.index):
        for d in (r.local.dead if r.local is not None else []):
            out.append(Finding("dead-output", "warning", f"{d.problem} — a dead output (no later op reads it and the "
                               "model does not return it): reported, not the reason the op falls back", r.index,
                               r.op, r.module))
        if r.status == Status.DIVERGENT and not store.graph.reaches_output(r.index):
            out.append(Finding("unreached", "warning", "out of bounds, but nothing it produces reaches the model's "
                               "outputs", r.index, r.op, r.module))
    return out + _precision_findings(results)


_PRECISION_NOTES = {
    "tf32": "the target computes float32 matmuls in TF32 (torch.backends.cuda.matmul.allow_tf32, "
            "torch.backends.cudnn.allow_tf32); run with TF32 off (torch-cuda, not torch-cuda-tf32) to check float32",
    "bfloat16": "the target rounds float32 operands to bfloat16 (reduced-precision matmul or reduction)",
    "float16": "the target rounds float32 operands to float16 (reduced-precision matmul or reduction)",
}


def _precision_findings(results: dict[int, LocalResult]) -> list[Finding]:
    """One finding per reduced precision that out-of-bounds contractions are consistent with (a mode, not a bug)."""
    by: dict[str, list[LocalResult]] = {}
    for r in sorted(results.values(), key=lambda r: r.index):
        b = r.local.bound if r.local is not None else None
        if b is not None and b.precision in _PRECISION_NOTES:
            by.setdefault(b.precision, []).append(r)
    return [Finding("precision", "warning", f"{len(rs)} out-of-bounds contractions are consistent with "
                    f"{name.upper() if name == 'tf32' else name}: {_PRECISION_NOTES[name]}", rs[0].index, rs[0].op,
                    rs[0].module) for name, rs in by.items()]


def _rank(store: FixtureStore, results: dict[int, LocalResult], judge: Judge,
          impact: Callable[[list[int]], float] | None) -> tuple[LocalResult | None, list[Candidate], str | None]:
    """The culprit among the ops out of bounds whose effect reaches the output; with several, the
    one whose signature alone on the target moves the model's output most (a few extra runs)."""
    reaching = [results[i] for i in sorted(results)
                if results[i].status == Status.DIVERGENT and store.graph.reaches_output(i)]
    if len(reaching) <= 1 or impact is None:
        return (reaching[0] if reaching else None), [], None
    first_of: dict[str, LocalResult] = {}
    for r in reaching:
        first_of.setdefault(store.ops[r.index]["signature"], r)
    ranked = sorted(first_of.values(), key=lambda r: -_severity(r))[:5]
    candidates = []
    for r in ranked:
        sig = store.ops[r.index]["signature"]
        calls = [op["index"] for op in store.ops if op["signature"] == sig]
        rec = store.ops[r.index]
        candidates.append(Candidate(r.index, r.op, r.module, rec["call"], _severity(r), impact(calls)))
    best = max(candidates, key=lambda c: (c.end_to_end if c.end_to_end is not None else -1.0, c.local_ratio or 0))
    culprit = results[best.index]
    others = ", ".join(f"{c.op} (#{c.index}: {c.end_to_end:.3g})" for c in candidates if c is not best)
    explains = (f"{len(reaching)} ops are out of bounds on their own; offloaded alone, this one moves the model's "
                f"output most ({best.end_to_end:.3g}; {others})")
    return culprit, candidates, explains


def _severity(r: LocalResult) -> float:
    m = r.local
    if m is None:
        return 0.0
    if m.bound is not None:
        return m.bound.ratio
    return m.max_abs if m.max_abs is not None else float("inf")


def _twice_differs(store: FixtureStore, target: Target, index: int) -> bool | None:
    """Run one call twice on the target with the same inputs: a target that answers differently is noisy."""
    try:
        op = store.op_call(index)
        a = target.execute(op, store.inputs(index))
        b = target.execute(op, store.inputs(index))
    except (Unsupported, OpFailed, TapmlError):
        return None
    return any(x.shape != y.shape or not torch.equal(x.nan_to_num(), y.nan_to_num())
               for x, y in zip(a, b, strict=False))

"""Fidelity on any model: carve, replay and offload every OpInfo sample and every zoo workload.

Why: tapml claims to carve *any* eager model, replay it bit-exactly and offload it to the identity
target (``torch-cpu``) with 100% coverage and zero local error. PyTorch's OpInfo database is the
widest public set of op calls (every layout, dtype quirk and odd argument its own tests exercise),
so each CPU float32 sample, wrapped in a one-op module, is a model tapml must get exactly right.
Each sample is classified by the first thing that went wrong (carve, replay, live run, verdict,
coverage, local error); samples whose plain eager call raises are skipped and counted apart.

Usage: python benchmarks/fidelity.py [--per-op K] [--only GLOB] [--limit N] [--no-zoo] [--no-opinfo]
                                     [--generate N] [--worker] [--timeout S] [--json out.json]

The whole sweep (18,762 OpInfo samples, 29 zoo forwards) took 3 minutes on an idle 2-core machine
(about 6 CPU-minutes since stores verify every tensor on load), so every sample is the default.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map

ROOT = Path(__file__).resolve().parent.parent
TAPML_DIRS = tuple(str(ROOT / d) + os.sep for d in ("tapml", "carving", "platforms", "remote", "reports"))


class SampleTimeout(BaseException):
    """The per-sample alarm fired (not an ``Exception``: tapml must not wrap it as the model's error)."""


@dataclass
class Row:
    """One sample (or zoo workload): what happened at each stage, and its primary cause."""

    kind: str  # opinfo | zoo
    name: str
    sample: int = 0
    desc: str = ""
    cause: str = ""
    stage: str = ""  # eager | carve | open | replay | migrate | verdict | coverage | local | ok | harness
    eager: str = "ok"  # ok | raised | nondeterministic
    mutates: bool = False
    carve: str | None = None  # ok | refused | crashed
    carve_error: str | None = None
    blames_model: bool | None = None  # tapml reported its own failure as ModelRaised (the model's error)
    ops: int | None = None
    replay_ok: bool | None = None
    replay_mismatches: list[str] = field(default_factory=list)
    migrate: str | None = None  # ok | refused | crashed
    migrate_error: str | None = None
    verdict: str | None = None
    summary: str | None = None
    coverage: float | None = None
    compute_ops: int | None = None
    offloaded_ops: int | None = None
    max_local_error: float | None = None
    diverged: list[str] = field(default_factory=list)
    not_offloaded: list[str] = field(default_factory=list)
    tapml_frame: str | None = None  # innermost tapml frame of a traceback
    traceback: str | None = None
    seconds: float = 0.0


# -- helpers ----------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _tapml_frame(e: BaseException) -> str | None:
    """The innermost frame in tapml's own code across the exception's cause chain."""
    found = None
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for fr in traceback.extract_tb(e.__traceback__):
            if fr.filename.startswith(TAPML_DIRS):
                found = f"{os.path.relpath(fr.filename, ROOT)}:{fr.name}:{fr.lineno}"
        e = e.__cause__ or e.__context__
    return found


def _normalize(text: str) -> str:
    """A message with its numbers, shapes and names of temp paths replaced: groups like causes."""
    text = re.sub(r"/tmp/\S+", "<path>", text)
    text = re.sub(r"\b[0-9a-f]{16,}\b", "<key>", text)
    text = re.sub(r"\b[a-z_]+\.\w+\.\w+\b", "<op>", text)
    text = re.sub(r"\[[\d, ]*\]|\([\d, ]*\)", "[..]", text)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    return text[:140]


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    def fire(signum, frame):
        raise SampleTimeout(f"timed out after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _same(a: Any, b: Any) -> bool:
    """Bitwise-equal outputs (NaN equal to NaN), for the eager determinism check."""
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            if x != y and not (isinstance(x, float) and x != x and y != y):
                return False
            continue
        if x.layout != torch.strided:
            x, y = x.to_dense(), y.to_dense()
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if (x.is_floating_point() or x.is_complex()) and not bool(((x == y) | ((x != x) & (y != y))).all()):
            return False
        if not (x.is_floating_point() or x.is_complex()) and not torch.equal(x, y):
            return False
    return True


class _Inputs:
    """The sample's tensors, restorable to their original values before each run (ops that write
    into their inputs would otherwise see different inputs on every live run)."""

    def __init__(self, tree: Any):
        self.tree = tree
        self.saved = [(t, t.detach().clone(memory_format=torch.preserve_format), t.shape, t.stride(),
                       t.storage_offset())
                      for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.layout == torch.strided]

    def changed(self) -> bool:
        return any(t.shape != shape or t.stride() != stride or t.storage_offset() != off
                   or not torch.equal(t.nan_to_num(), saved.nan_to_num())
                   for t, saved, shape, stride, off in self.saved)

    def restore(self) -> None:
        with _disable_current_modes(), torch.no_grad():  # invisible to the tracer and to the mixed run
            for t, saved, shape, stride, off in self.saved:
                if t.shape != shape or t.stride() != stride or t.storage_offset() != off:
                    t.set_(saved.clone().untyped_storage(), 0, shape, saved.stride())
                else:
                    t.copy_(saved)


def _snapshot(out: Any) -> Any:
    """The output's tensors cloned, invisibly to tapml: an in-place op returns the sample's own input,
    which the next run overwrites, and the end-to-end check would then compare a tensor with itself."""
    with _disable_current_modes():
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


class OneOp(torch.nn.Module):
    """A model whose forward is one OpInfo call on one sample."""

    def __init__(self, fn: Callable[..., Any], sample: Any):
        super().__init__()
        self.fn, self.sample = fn, sample

    def forward(self) -> Any:
        s = self.sample
        return self.fn(s.input, *s.args, **s.kwargs)


# -- the stages -------------------------------------------------------------------------------------


def check(row: Row, model: torch.nn.Module, run: Callable[[], Any], workdir: Path, worker: Any = None,
          inputs: _Inputs | None = None) -> None:
    """Carve, replay, offload to torch-cpu (in process, or through ``worker``); fill ``row`` and its cause."""
    from tapml.carving import FixtureStore, ModelRaised, carve, replay
    from tapml.core import TapmlError
    from tapml.engine import migrate
    from tapml.judging import Judge
    from tapml.platforms import open_local

    out = workdir / "store"
    try:
        result = carve(model, run, out)
        row.carve, row.ops = "ok", result.ops
    except ModelRaised as e:
        cause = e.__cause__
        refused = isinstance(cause, TapmlError)
        row.carve = "refused" if refused else "crashed"
        row.carve_error = _first_line(cause) if cause is not None else _first_line(e)
        row.blames_model = True  # the eager call ran, yet the error is reported as the model's
        row.tapml_frame = _tapml_frame(e)
        row.traceback = "".join(traceback.format_exception(cause or e))[-3000:]
        row.stage = "carve"
        row.cause = f"carve {row.carve}: {_normalize(row.carve_error)}"
        return
    except Exception as e:  # outside the model's call: tapml's own code
        raise _Stage("carve", e) from e

    try:
        store = FixtureStore(out)  # the store carve just wrote must open
    except Exception as e:
        raise _Stage("open", e) from e
    try:
        report = replay(store)
    except Exception as e:
        raise _Stage("replay", e) from e
    row.replay_ok = report.ok
    row.replay_mismatches = [f"{m.op}: {m.reason}" for m in report.mismatches[:5]]

    target = worker or open_local("torch-cpu")
    try:
        # every live run starts from the sample as carved, as tapml.offload restores a workload's state
        r = migrate(run, store, target, judge=Judge(), plan="all", restore=inputs.restore if inputs else None)
        row.migrate = "ok"
    except Exception as e:
        refused = isinstance(e, TapmlError) or isinstance(getattr(e, "__cause__", None), TapmlError)
        row.migrate = "refused" if refused else "crashed"
        row.migrate_error = _first_line(e)
        row.blames_model = isinstance(e, ModelRaised)  # the eager call ran: any error here is tapml's
        row.tapml_frame = _tapml_frame(e)
        row.traceback = "".join(traceback.format_exception(e))[-3000:]
    finally:
        if worker is None:
            target.close()
    if row.migrate == "ok":
        row.verdict, row.summary = str(r.verdict), r.summary
        row.coverage, row.compute_ops, row.offloaded_ops = r.coverage, r.compute_ops, r.offloaded_ops
        errs = [o.local.max_abs for o in r.ops if o.local is not None and o.local.max_abs is not None]
        row.max_local_error = max(errs, default=None)
        row.diverged = [s.diverged for s in r.steps if s.diverged]
        views = {i for i, rec in enumerate(store.ops) if rec["view"]}
        for o in r.ops:
            if o.index in views or o.offloaded:
                continue
            why = o.reason or str(o.status)
            if o.propagated is not None and o.propagated.problem:
                why = f"fell back: {o.propagated.problem}"
            row.not_offloaded.append(f"{o.op}: {why}")
    _classify(row)


class _Stage(Exception):
    """An exception escaped a tapml stage (not the model's call)."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(stage)
        self.stage, self.error = stage, error


def _classify(row: Row) -> None:
    if not row.replay_ok:
        row.stage, row.cause = "replay", f"replay not bit-exact: {_normalize(row.replay_mismatches[0])}"
    elif row.migrate != "ok":
        row.stage, row.cause = "migrate", f"migrate {row.migrate}: {_normalize(row.migrate_error or '')}"
    elif row.verdict != "ok":
        why = row.diverged[0] if row.diverged else (row.summary or "")
        row.stage, row.cause = "verdict", f"verdict {row.verdict}: {_normalize(why)}"
    elif row.compute_ops == 0:
        row.stage, row.cause = "coverage", f"ok with no compute ops: {_normalize(row.summary or '')}"
    elif row.coverage is not None and row.coverage < 1:
        why = row.diverged[0] if row.diverged else (row.not_offloaded[0] if row.not_offloaded else "?")
        row.stage, row.cause = "coverage", f"ok but coverage < 100%: {_normalize(why)}"
    elif row.max_local_error:
        row.stage, row.cause = "local", "ok but nonzero local error"
    else:
        row.stage, row.cause = "ok", "ok"


def run_case(row: Row, make: Callable[[], tuple[torch.nn.Module, Callable[[], Any], _Inputs | None]],
             timeout: int, worker: Any = None) -> Row:
    """One sample or workload, every failure caught: a bad sample cannot stop the sweep."""
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="tapml-fidelity-"))
    try:
        with _alarm(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, run, inputs = make()
            if row.kind == "opinfo":  # the plain eager call: skip what fails without tapml
                try:
                    with torch.no_grad():
                        first = _snapshot(run())
                        if inputs is not None:
                            inputs.restore()
                        second = _snapshot(run())
                except Exception as e:
                    row.eager, row.stage, row.cause = "raised", "eager", "skipped: eager call raised"
                    row.carve_error = _first_line(e)
                    return row
                row.mutates = inputs is not None and inputs.changed()
                if not _same(first, second):
                    row.eager = "nondeterministic"
                if inputs is not None:
                    inputs.restore()  # the carve sees the sample as it was made
            check(row, model, run, workdir, worker, inputs)
    except _Stage as s:
        e = s.error
        refused = _is_tapml_error(e)
        row.stage = s.stage
        row.cause = f"{s.stage} {'refused' if refused else 'crashed'}: {_normalize(_first_line(e))}"
        if s.stage == "carve":
            row.carve, row.carve_error = ("refused" if refused else "crashed"), _first_line(e)
        else:
            row.migrate_error = _first_line(e)
        row.tapml_frame = _tapml_frame(e)
        row.traceback = "".join(traceback.format_exception(e))[-3000:]
    except SampleTimeout as e:
        row.stage = row.stage or "timeout"
        row.cause = f"timeout ({row.carve and 'after carve' or 'before carve done'}): {e}"
    except BaseException as e:  # noqa: B036 - nothing may stop the sweep except ^C
        if isinstance(e, KeyboardInterrupt):
            raise
        row.stage = "harness"
        row.cause = f"harness: {_normalize(_first_line(e))}"
        row.traceback = "".join(traceback.format_exception(e))[-3000:]
        row.tapml_frame = _tapml_frame(e)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        row.seconds = round(time.perf_counter() - start, 3)
    return row


def _is_tapml_error(e: BaseException) -> bool:
    from tapml.core import TapmlError

    return isinstance(e, TapmlError)


# -- the cases --------------------------------------------------------------------------------------


def opinfo_cases(per_op: int | None, only: str | None) -> Iterator[tuple[Row, Callable]]:
    """(row, factory) for each CPU float32 OpInfo sample; the first ``per_op`` of each OpInfo."""
    from torch.testing._internal.common_methods_invocations import op_db

    for op in op_db:
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        if only and not fnmatch.fnmatchcase(name, only):
            continue
        if torch.float32 not in op.supported_dtypes("cpu"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                samples = iter(op.sample_inputs("cpu", torch.float32))
                for k, sample in enumerate(samples):
                    if per_op is not None and k >= per_op:
                        break
                    yield Row("opinfo", name, k, _describe(sample)[:200]), _opinfo_factory(op, sample)
        except Exception as e:  # the OpInfo's own sample generator failed: not tapml's business
            row = Row("opinfo", name, -1, cause="skipped: sample_inputs raised", stage="eager", eager="raised")
            row.carve_error = _first_line(e)
            yield row, None


def _describe(sample: Any) -> str:
    def d(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"T{list(v.shape)}{'' if v.is_contiguous() else 's' + str(v.stride())}" \
                if v.layout == torch.strided else f"T<{v.layout}>{list(v.shape)}"
        if isinstance(v, (list, tuple)):
            return "(" + ",".join(d(x) for x in v) + ")"
        return repr(v)[:30]

    kw = ",".join(f"{k}={d(v)}" for k, v in sample.kwargs.items())
    return f"{d(sample.input)}; {d(sample.args)}; {kw}"


def _opinfo_factory(op: Any, sample: Any) -> Callable:
    def make() -> tuple[torch.nn.Module, Callable[[], Any], _Inputs]:
        model = OneOp(op.get_op(), sample)
        inputs = _Inputs([sample.input, list(sample.args), dict(sample.kwargs)])

        return model, model, inputs

    return make


def zoo_cases(only: str | None, generate: int | None) -> Iterator[tuple[Row, Callable]]:
    """(row, factory) for each zoo workload: its forward, or its generation of ``generate`` tokens."""
    from tapml.workloads import load_workload
    from tapml.zoo import ZOO

    for name in ZOO:
        if only and not fnmatch.fnmatchcase(name, only):
            continue

        def make(name: str = name) -> tuple[torch.nn.Module, Callable[[], Any], None]:
            w = load_workload(f"zoo:{name}")
            return w.model, (lambda: w.run(generate)), None

        if generate is None or ZOO[name].generate:
            yield Row("zoo", name, desc=f"generate {generate}" if generate else "forward"), make


# -- the report -------------------------------------------------------------------------------------


def tally(rows: list[Row]) -> str:
    """A markdown table: each cause, its samples, its OpInfos (or workloads), where tapml raised, an example."""
    by: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by[f"{r.kind}: {r.cause}"].append(r)
    lines = ["| cause | samples | ops | where in tapml | example |", "| --- | ---: | ---: | --- | --- |"]
    for cause, rs in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        ex = rs[0]
        cell = cause.replace("|", "\\|")
        frames = Counter(r.tapml_frame for r in rs if r.tapml_frame and r.stage in ("carve", "open", "migrate"))
        where = frames.most_common(1)[0][0] if frames else ""
        lines.append(f"| {cell} | {len(rs)} | {len({r.name for r in rs})} | {where} | "
                     f"{ex.name}#{ex.sample} {ex.desc[:60].replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-op", type=int, help="only the first K samples of each OpInfo (default: every sample)")
    p.add_argument("--only", help="glob on the OpInfo or zoo name")
    p.add_argument("--limit", type=int, help="stop after N cases of each kind")
    p.add_argument("--no-zoo", action="store_true")
    p.add_argument("--no-opinfo", action="store_true")
    p.add_argument("--generate", type=int, help="zoo: carve and offload a generation of N tokens (decoders only)")
    p.add_argument("--worker", action="store_true",
                   help="offload through one spawned torch-cpu worker (the wire) instead of in process")
    p.add_argument("--timeout", type=int, default=60, help="seconds per sample (zoo: 10x)")
    p.add_argument("--json", type=Path, help="write per-sample rows here")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    rows: list[Row] = []
    kinds: list[tuple[str, Iterator, int]] = []
    if not args.no_opinfo:
        kinds.append(("opinfo", opinfo_cases(args.per_op, args.only), args.timeout))
    if not args.no_zoo:
        kinds.append(("zoo", zoo_cases(args.only, args.generate), args.timeout * 10))
    worker = None
    if args.worker:
        from tapml.remote import RemoteTarget

        worker = RemoteTarget(spawn="torch-cpu", timeout=args.timeout)
    try:
        for _, cases, timeout in kinds:
            for n, (row, make) in enumerate(cases):
                if args.limit is not None and n >= args.limit:
                    break
                if make is not None:
                    torch.manual_seed(0)
                    run_case(row, make, timeout, worker)
                rows.append(row)
                if not args.quiet:
                    print(f"{len(rows):6d} {row.seconds:6.2f}s {row.kind} {row.name}#{row.sample}: {row.cause}",
                          file=sys.stderr, flush=True)
    finally:
        if worker is not None:
            worker.close()
    wall = time.perf_counter() - start
    print(tally(rows))
    counts = Counter(r.stage for r in rows)
    print(f"\n{len(rows)} cases in {wall:.0f} s; by first failing stage: "
          + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    if args.json:
        args.json.write_text(json.dumps({"wall_s": round(wall, 1), "argv": sys.argv[1:],
                                         "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

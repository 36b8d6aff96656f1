"""The Python API: carve, offload, replay, inspect, repro, report, diff — what the CLI does, from a notebook.

Every CLI command is a thin client of these functions, so nothing tapml can do
is reachable only from the command line::

    import tapml
    run = tapml.offload(model, inputs, platform="fp16")
    run.verdict, run.culprit, run.ops["aten.addmm*"], run.to_json()
    run                                      # in Jupyter: the report's summary and culprit card
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import reports
from .carving import AtomicDir, CarveOptions, FixtureStore, ModelRaised, ReplayReport
from .carving import carve as carve_model
from .carving import replay as replay_store
from .core import TapmlError
from .devices import check_device, device_runner, move_to
from .engine import LocalResult, ModelState, local_pass, migrate, reference_info, select_ops, torch_reference
from .progress import CompileClock, Progress, ProgressEvents
from .record import Run
from .repro_script import platform_spec, write_repro
from .settings import Settings
from .workloads import Workload, load_workload

__all__ = ["carve", "offload", "replay", "inspect", "repro", "report", "diff", "load_run", "emit_tests", "test",
           "zoo", "matrix", "platforms", "serve", "open_store", "as_workload", "ReplayResult", "DiffResult",
           "Progress", "CarveOptions"]

load_run = reports.load_run


def open_store(store: str | os.PathLike | FixtureStore) -> FixtureStore:
    """A fixture store by path (or as given); every problem is one ``TapmlError`` line."""
    return store if isinstance(store, FixtureStore) else FixtureStore(store)


def as_workload(model: Any, inputs: Any = None) -> Workload:
    """A spec (``zoo:NAME``, ``FILE.py:factory``), a ``Workload``, or a module with its inputs."""
    if isinstance(model, Workload):
        return model
    if isinstance(model, str):
        if inputs is not None:
            raise TapmlError("give inputs with a module, not with a model spec (the factory supplies them)")
        return load_workload(model)
    if isinstance(model, torch.nn.Module):
        if inputs is None:
            raise TapmlError("a module needs its inputs: tapml.carve(model, inputs, ...)")
        model.eval()
        return Workload(model=model, inputs=inputs, name=type(model).__name__)
    raise TapmlError(f"model must be a torch.nn.Module, a Workload or a spec string, not {type(model).__name__}")


def _info(workload: Workload, spec: Any, generate: int | None) -> dict:
    return {"spec": spec if isinstance(spec, str) else None, "name": workload.name,
            "description": workload.description, "class": type(workload.model).__name__, "generate": generate}


def _on_reference(workload: Workload, device: str) -> Callable[[int | None], Any]:
    """``run(generate)`` on the reference device, the model and inputs moved there (``tapml.devices``)."""
    if device != "cpu":
        workload.inputs = move_to(workload.inputs, device)
    return device_runner(workload.model, workload.run, device)


def carve(model: Any, inputs: Any = None, out: str | os.PathLike | None = None, *, generate: int | None = None,
          force: bool = False, options: CarveOptions | None = None,
          on_op: Callable[[int], None] | None = None, model_info: dict | None = None,
          reference_device: str = "cpu") -> FixtureStore:
    """Run the model once on the reference (PyTorch on ``reference_device``: ``cpu`` or ``cuda[:N]``) and
    record every op into a fixture store at ``out`` (a temporary directory when ``out`` is None)."""
    device = check_device(reference_device)
    workload = as_workload(model, inputs)
    if options is not None and options.modules:
        try:
            re.compile(options.modules)
        except re.error as e:
            raise TapmlError(f"--modules {options.modules!r} is not a valid regex: {e}") from None
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="tapml-store-")) / "store"
    try:
        run = _on_reference(workload, device)
        result = carve_model(workload.model, lambda: run(generate), out, force=force,
                             options=options or CarveOptions(),
                             model_info=model_info or _info(workload, model, generate),
                             on_op=on_op, reference=reference_info(device))
    except ModelRaised as e:
        if isinstance(e.__cause__, TapmlError):
            raise e.__cause__ from None
        raise TapmlError(f"{workload.name} raised while carving: {e}") from e
    return FixtureStore(result.path)


def offload(model: Any, inputs: Any = None, *, platform: str | None = None, settings: Settings | None = None,
            store: str | os.PathLike | FixtureStore | None = None, out: str | os.PathLike | None = None,
            force: bool = False, plan: str = "layers", layers: str | None = None, generate: int | None = None,
            check_reference: bool = False, on_event: Callable[[str, Any], None] | None = None,
            on_progress: Callable[[Progress], None] | None = None, reference_device: str = "cpu") -> Run:
    """Carve (or reuse ``store``), migrate step by step to the target, localize; returns the ``Run``.

    The live reference runs on ``reference_device``. A reused ``store`` is the reference: its outputs
    stand for the model's wherever the live run repeats the carve (a store carved on CUDA judges a run
    here). With ``out``, ``run.json``, ``report.html``, ``model-explorer.json``, the culprit's standalone
    ``repro/`` and (when carved here) ``store/`` are written there atomically; without ``out`` a store carved
    here lies in a temporary folder (``run.store``), removed when the call fails. ``on_event`` gets the
    engine's events, ``on_progress`` the same as ``Progress`` with totals."""
    settings = settings or Settings(platform=platform or "torch-cpu")
    if platform is not None and settings.platform != platform:
        settings = Settings(**{**settings.__dict__, "platform": platform})
    device = check_device(reference_device)
    workload = as_workload(model, inputs)
    info = _info(workload, model, generate)
    live = _on_reference(workload, device)
    state = ModelState(workload.model, workload.inputs)  # before the carve: each live run starts as it did
    outdir = AtomicDir(out, force=force) if out is not None else None
    # without OUT a carve goes to a temporary folder: kept when the run returns (the Run's store), removed on
    # any failure; a reused store needs no folder at all
    scratch = Path(outdir.tmp) if outdir else Path(tempfile.mkdtemp(prefix="tapml-run-")) if store is None else None
    returned = False
    try:
        if store is None:
            opened = carve(workload, out=scratch / "store", generate=generate, model_info=info,
                           reference_device=device)
            store_path = str(Path(out) / "store") if out is not None else str(scratch / "store")
        else:
            opened = open_store(store)
            _check_same_model(opened, info)
            store_path = str(opened.path)
        opened.share(state.resident())  # the isolated pass may read the model's own weights (probe.py)
        events = ProgressEvents(opened, plan, layers, settings.all_calls, on_progress, on_event)
        target = CompileClock(settings.open_target())
        compile_marks: list[float] = []  # compile seconds so far at each step's start and at the isolated pass

        def on_engine_event(kind: str, payload: Any) -> None:
            if kind in ("step", "local"):
                compile_marks.append(target.compile_s)
            events(kind, payload)

        try:
            run = migrate(lambda: live(generate), opened, target, judge=settings.judge(target), plan=plan,
                          layers=layers, all_calls=settings.all_calls, check_reference=check_reference,
                          model_info=info, store_path=store_path, restore=state.restore, on_event=on_engine_event,
                          reference=torch_reference(device), saved_reference=store is not None)
        except ModelRaised as e:
            raise TapmlError(f"{workload.name} raised during a mixed run: {e}") from e
        finally:
            target.close()
            opened.unshare()  # a store the caller passed in must not keep the model alive
        _annotate(run, opened, settings, compile_marks)
        if outdir is not None:
            if run.culprit is not None and run.culprit.level == "op":  # a unit's repro is its offload command
                _write_culprit_repro(run, opened, outdir.tmp / "repro")
            run.write(outdir.tmp / "run.json")
            (outdir.tmp / "report.html").write_text(reports.render_report(run))
            reports.write_model_explorer(run, outdir.tmp / "model-explorer.json")
            outdir.commit()
        returned = True
        return run
    finally:
        if outdir is not None:
            outdir.abort()
        elif scratch is not None and not returned:
            shutil.rmtree(scratch, ignore_errors=True)


def _write_culprit_repro(run: Run, store: FixtureStore, out: Path) -> None:
    """The culprit's standalone repro beside run.json; an op that cannot be written as a script (an
    opaque argument) costs the repro, with a note, not the run."""
    c = run.culprit
    try:
        write_repro(store, c.index, out, platform=run.target.get("spec", run.target["name"]), rule=run.rule,
                    compute_dtype=run.compute_dtype, tolerance=c.local.tolerance)
    except TapmlError as e:
        run.notes.append(f"no standalone repro of the culprit: {e}")
        return
    c.repro_dir = out.name


def _annotate(run: Run, store: FixtureStore, settings: Settings, compile_marks: list[float]) -> None:
    """What the API knows beyond the engine: how to reopen the platform (also in the culprit's replay
    command, which names a FILE.py:Class platform by the spec it opens with), which ops are views, and
    each step's compile time (taken out of its transfer + RPC share)."""
    if settings.remote is None and settings.platform:
        run.target["spec"] = spec = platform_spec(settings.platform)
        if run.culprit is not None and run.culprit.level == "op":
            run.culprit.repro = f"tapml replay {run.store} --platform {spec} --op {run.culprit.index}"
        elif run.culprit is not None:  # a unit or kernel: the top-down offload that finds it again
            run.culprit.repro = run.culprit.repro.replace(f"--platform {run.target['name']} ", f"--platform {spec} ")
    for row in run.ops:
        row.view = bool(store.ops[row.index]["view"])
    for step, (before, after) in zip(run.steps, itertools.pairwise(compile_marks), strict=False):
        t = step.timing
        t.compile_s = max(0.0, after - before)
        t.transfer_and_overhead_s = max(0.0, t.transfer_and_overhead_s - t.compile_s)


def _check_same_model(store: FixtureStore, info: dict) -> None:
    carved = store.manifest.get("model", {})
    if carved.get("spec") not in (None, info["spec"]) or carved.get("generate") != info["generate"]:
        raise TapmlError(f"{store.path} was carved from {carved.get('spec')} (generate={carved.get('generate')}), "
                         f"not {info['spec']} (generate={info['generate']})")


@dataclass
class ReplayResult:
    """Carved ops replayed on a target with the reference's inputs."""

    store: str
    platform: str
    results: list[LocalResult] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(str(r.status) for r in self.results))

    @property
    def ok(self) -> bool:
        return not any(r.status == "divergent" or r.status.failed for r in self.results)


def replay(store: str | os.PathLike | FixtureStore, *, platform: str | None = None,
           settings: Settings | None = None, ops: list[int] | None = None,
           on_result: Callable[[LocalResult], None] | None = None,
           on_progress: Callable[[Progress], None] | None = None) -> ReplayResult:
    """Each selected carved op (default: the first call of each signature, as ``offload``'s isolated
    pass; every call with ``settings.all_calls``) run on the target with the reference's inputs: its
    local error."""
    opened = open_store(store)
    settings = settings or Settings(platform=platform or "torch-cpu")
    bad = [i for i in ops or () if not 0 <= i < len(opened.ops)]
    if bad:
        raise TapmlError(f"op {bad[0]}: the store has ops 0..{len(opened.ops) - 1}")
    indices = list(ops) if ops else select_ops(opened, all_calls=settings.all_calls)
    target = settings.open_target(platform)
    shown = Progress("replay", f"replaying on {target.name}", 0, len(indices))

    def each(result: LocalResult) -> None:
        shown.done += 1
        if on_result is not None:
            on_result(result)
        if on_progress is not None:
            on_progress(shown)

    try:
        results = local_pass(opened, target, settings.judge(target), indices=indices, on_result=each)
    finally:
        target.close()
    return ReplayResult(str(opened.path), target.name, list(results.values()))


def inspect(store: str | os.PathLike | FixtureStore, *, verify: bool = True,
            replay: bool = False) -> tuple[dict, ReplayReport | None]:
    """What a store holds (re-hashing every tensor unless ``verify=False``), and optionally
    whether the reference reproduces every op bit-exactly."""
    from .inspection import summarize

    opened = open_store(store)
    if verify:
        opened.verify()
    report = replay_store(opened) if replay else None
    return summarize(opened, verified=verify, replay=report), report


def repro(source: str | os.PathLike | Run | FixtureStore, out: str | os.PathLike, *, op: int | None = None,
          platform: str | None = None, rule: str | None = None, force: bool = False) -> Path:
    """A standalone repro directory for one op: its inputs and a script that calls it on a platform.

    ``source`` is a run record (``run.json`` or a ``Run``: the store, platform, rule and tolerance come
    from it, and ``op`` defaults to the culprit) or a fixture store (``op`` required, platform default
    torch-cpu)."""
    run = source if isinstance(source, Run) else None
    if run is None and not isinstance(source, FixtureStore) and Path(source).is_file():
        run = load_run(source)
    if run is None:
        if op is None:
            raise TapmlError("give --op N: which op of the store to reproduce")
        return write_repro(open_store(source), op, out, platform=platform or "torch-cpu", rule=rule or "bound",
                           force=force)
    if op is None:
        if run.culprit is None:
            raise TapmlError(f"the run's verdict is {run.verdict} with no culprit: give --op N")
        op = run.culprit.index
    if not 0 <= op < len(run.ops):
        raise TapmlError(f"op {op}: the run has ops 0..{len(run.ops) - 1}")
    return write_repro(open_store(run.store), op, out, platform=platform or run.target.get("spec", run.target["name"]),
                       rule=rule or run.rule, compute_dtype=run.compute_dtype, tolerance=run.ops[op].tolerance,
                       force=force)


def _record(run: str | os.PathLike | Run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def report(run: str | os.PathLike | Run, out: str | os.PathLike | None = None, *,
           model_explorer: str | os.PathLike | None = None) -> Path:
    """Render a run record as one self-contained HTML file: ``out``, or ``report.html`` next to the
    ``run.json`` it was read from. ``model_explorer`` also writes the Model Explorer node-data overlay."""
    record = _record(run)
    if out is None:
        if isinstance(run, Run):
            raise TapmlError("give out: where to write the report of a run held in memory")
        out = Path(run).parent / "report.html"
    path = reports.write_report(record, out, run_json=None if isinstance(run, Run) else run)
    if model_explorer is not None:
        reports.write_model_explorer(record, model_explorer)
    return path


@dataclass
class DiffResult:
    """Two runs compared op by op: the HTML written, and every matched op's row."""

    path: Path
    rows: list[dict]
    counts: dict[str, int]
    unmatched: int

    def to_json(self) -> dict:
        return {"diff": str(self.path), "counts": self.counts, "unmatched": self.unmatched, "ops": self.rows}


def diff(run_a: str | os.PathLike, run_b: str | os.PathLike, out: str | os.PathLike | None = None) -> DiffResult:
    """The same ops across two runs (two compilers, two targets): worse, better, newly (un)supported.
    Writes ``out``, or ``diff-<B's folder>.html`` next to run A."""
    a, b = load_run(run_a), load_run(run_b)
    if out is None:
        out = Path(run_a).parent / f"diff-{Path(run_b).resolve().parent.name or 'b'}.html"
    path = reports.write_diff(a, b, out, names=(str(run_a), str(run_b)))
    d = reports.diff_records(a, b)
    return DiffResult(path, d["rows"], dict(d["counts"]), d["unmatched"])


def emit_tests(store: str | os.PathLike | FixtureStore, out: str | os.PathLike, *, only: str | None = None,
               all_calls: bool = False, force: bool = False, units: str = "ops") -> dict:
    """Standalone, readable pytest files for the store's ops (``units="modules"``: its module units) plus a
    subset store (see ``tapml.emit``)."""
    from .emit import emit_tests as write_tests

    return write_tests(open_store(store), out, only=only, all_calls=all_calls, force=force, units=units)


def test(store: str | os.PathLike | FixtureStore, platforms: tuple[str, ...] | list[str] = (),
         remote: str | None = None, all_calls: bool = False, pytest_args: list[str] | None = None) -> int:
    """pytest over a store's carved ops (the pytest plugin); returns pytest's exit code."""
    from .pytest_plugin import run_pytest

    return run_pytest(open_store(store).path, platforms, remote, all_calls, list(pytest_args or []))


def zoo() -> list[dict]:
    """The built-in workloads: ``name``, ``spec``, ``description``."""
    from .zoo import ZOO

    return [e.to_json() for e in ZOO.values()]


def matrix(names: list[str] | None = None, targets: tuple[str, ...] = ("torch-cpu", "fp16", "bf16", "tvm-llvm"),
           out: str | os.PathLike | None = None,
           on_row: Callable[[dict], None] | None = None) -> tuple[list[dict], str]:
    """Every named workload (default: the whole zoo) offloaded to every target: rows and a markdown table."""
    from .matrix import run_matrix_to
    from .zoo import ZOO

    return run_matrix_to(names or list(ZOO), targets, out, on_row=on_row)


def platforms(names: tuple[str, ...] | list[str] = ()) -> list[dict]:
    """Every known platform (and the named ``FILE.py:Class`` ones): availability, reasons, capabilities."""
    from .platforms import describe_platforms

    return describe_platforms(names)


def serve(platform: str, *, host: str = "127.0.0.1", port: int = 0, token_file: str | None = None,
          max_payload: int = 1 << 30, cache_bytes: int = 4 << 30, supervise: bool = False,
          kernel_timeout: float = 60.0) -> None:
    """Serve one platform to tapml clients over RPC until killed (``tapml worker``)."""
    from .remote import WorkerConfig, run_worker
    from .settings import read_token

    config = WorkerConfig(platform=platform, host=host, port=port, token=read_token(token_file) or "",
                          max_payload=max_payload, cache_bytes=cache_bytes)
    run_worker(config, supervise=supervise, kernel_timeout=kernel_timeout)

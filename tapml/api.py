"""The Python API: carve, offload, replay, inspect — what the CLI does, callable from a notebook.

Every CLI command is a thin client of these functions, so nothing tapml can do
is reachable only from the command line.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .carving import AtomicDir, CarveOptions, FixtureStore, ModelRaised, ReplayReport
from .carving import carve as carve_model
from .carving import replay as replay_store
from .core import TapmlError
from .engine import LocalResult, ModelState, local_pass, migrate
from .record import Run
from .settings import Settings
from .workloads import Workload, load_workload

__all__ = ["carve", "offload", "replay", "inspect", "open_store", "as_workload", "ReplayResult"]


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


def carve(model: Any, inputs: Any = None, out: str | os.PathLike | None = None, *, generate: int | None = None,
          force: bool = False, options: CarveOptions | None = None,
          on_op: Callable[[int], None] | None = None, model_info: dict | None = None) -> FixtureStore:
    """Run the model once on the reference and record every op into a fixture store at ``out``
    (a temporary directory when ``out`` is None). Returns the opened store."""
    workload = as_workload(model, inputs)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="tapml-store-")) / "store"
    try:
        result = carve_model(workload.model, lambda: workload.run(generate), out, force=force,
                             options=options or CarveOptions(),
                             model_info=model_info or _info(workload, model, generate),
                             on_op=on_op)
    except ModelRaised as e:
        if isinstance(e.__cause__, TapmlError):
            raise e.__cause__ from None
        raise TapmlError(f"{workload.name} raised while carving: {e}") from e
    return FixtureStore(result.path)


def offload(model: Any, inputs: Any = None, *, platform: str | None = None, settings: Settings | None = None,
            store: str | os.PathLike | FixtureStore | None = None, out: str | os.PathLike | None = None,
            force: bool = False, plan: str = "layers", layers: str | None = None, generate: int | None = None,
            check_reference: bool = False, on_event: Callable[[str, Any], None] | None = None) -> Run:
    """Carve (or reuse ``store``), migrate step by step to the target, localize; returns the ``Run``.

    With ``out``, ``run.json``, ``report.html`` and (when carved here) ``store/`` are written
    there atomically."""
    settings = settings or Settings(platform=platform or "torch-cpu")
    if platform is not None and settings.platform != platform:
        settings = Settings(**{**settings.__dict__, "platform": platform})
    workload = as_workload(model, inputs)
    info = _info(workload, model, generate)
    state = ModelState(workload.model, workload.inputs)  # before the carve: each live run starts as it did
    outdir = AtomicDir(out, force=force) if out is not None else None
    scratch = Path(outdir.tmp if outdir else tempfile.mkdtemp(prefix="tapml-run-"))
    try:
        if store is None:
            opened = carve(workload, out=scratch / "store", generate=generate, model_info=info)
            store_path = str(Path(out) / "store") if out is not None else str(scratch / "store")
        else:
            opened = open_store(store)
            _check_same_model(opened, info)
            store_path = str(opened.path)
        target = settings.open_target()
        try:
            run = migrate(lambda: workload.run(generate), opened, target, judge=settings.judge(target), plan=plan,
                          layers=layers, all_calls=settings.all_calls, check_reference=check_reference,
                          model_info=info, on_event=on_event, store_path=store_path, restore=state.restore)
        except ModelRaised as e:
            raise TapmlError(f"{workload.name} raised during a mixed run: {e}") from e
        finally:
            target.close()
        if outdir is not None:
            from .reports import render_report

            run.write(outdir.tmp / "run.json")
            (outdir.tmp / "report.html").write_text(render_report(run))
            outdir.commit()
        return run
    finally:
        if outdir is not None:
            outdir.abort()


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
           on_result: Callable[[LocalResult], None] | None = None) -> ReplayResult:
    """Each selected carved op (default: the first call of each signature, or every call with
    ``settings.all_calls``) run on the target with the reference's inputs: its local error."""
    opened = open_store(store)
    settings = settings or Settings(platform=platform or "torch-cpu")
    bad = [i for i in ops or () if not 0 <= i < len(opened.ops)]
    if bad:
        raise TapmlError(f"op {bad[0]}: the store has ops 0..{len(opened.ops) - 1}")
    target = settings.open_target(platform)
    try:
        results = local_pass(opened, target, settings.judge(target), indices=list(ops) if ops else None,
                             all_calls=settings.all_calls, on_result=on_result)
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

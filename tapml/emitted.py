"""What emitted carved-op tests run on: ``@carved_op`` turns a function showing an op call into a pytest test.

An emitted test reads as the call the reference made::

    @carved_op(0, id="encoder.layer.3.intermediate.intermediate_act_fn#0")
    def test_0258_aten_gelu_default(x):
        return torch.ops.aten.gelu.default(x)

The decorator feeds the function the op's carved inputs (from ``carved_store/``
beside the test file) and checks that it reproduces the reference's recorded
output, so the call shown is the call tested; then the same op runs on the
target (the ``tapml_target`` fixture of the emitted ``conftest.py``) and is
judged as ``tapml offload`` judges it — a failure is the pytest plugin's numeric
report. ``RULE`` and ``TOLERANCE`` in the test module (or ``rule=``/``tolerance=``
on one test) are the knobs.

``@carved_unit`` is the same for a module unit (``emit-tests --units modules``): the
module call's program from ``carved_units.json``, checked to reproduce the carved
outputs on the reference, then compiled whole on the target and judged as the
top-down run's isolated unit pass judges it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from .carving import FixtureStore
from .core import UnitCall, flatten_outputs
from .engine import run_local, unit_alone
from .failure_report import mismatch_report, where
from .judging import split_tolerances
from .platforms import Target, run_program
from .settings import Settings

__all__ = ["carved_op", "carved_unit", "open_target"]


def open_target(platform: str) -> Target:
    """The platform in this process (emitted tests need no worker)."""
    return Settings(platform=platform, in_process=True).open_target()


@functools.cache
def _store(path: str) -> FixtureStore:
    return FixtureStore(path)


@functools.cache
def _settings(rule: str, tolerance: str) -> Settings:
    return Settings(rule=rule, tolerances=tuple(split_tolerances(tolerance)))


def _judged(result, head: str) -> None:
    """An isolated result as a test outcome: skipped with the reason, failed with the numeric report."""
    if result.status in ("unsupported", "skipped"):
        pytest.skip(f"{head.splitlines()[0]}: {result.status}: {result.reason}")
    if result.status != "ok":
        report = mismatch_report(result.local, head) if result.local is not None else \
            f"{head}\n{result.status}: {result.reason}"
        pytest.fail(report, pytrace=False)


def _named(test: Callable, shown: Callable) -> Callable:
    """The test takes the name, docstring and module of the function it was made from."""
    test.__name__ = test.__qualname__ = shown.__name__
    test.__doc__ = shown.__doc__
    test.__module__ = shown.__module__
    return test


def carved_op(index: int, *, id: str, rule: str | None = None, tolerance: str | None = None
              ) -> Callable[[Callable], Callable]:
    """Op ``index`` of the test file's ``carved_store``: ``id`` names it (module path and call)."""

    def wrap(call: Callable) -> Callable:
        module = call.__globals__
        store_dir = str(Path(module["__file__"]).with_name("carved_store"))

        @pytest.mark.parametrize("carved_call", [index], ids=[id])
        def test(carved_call: int, tapml_target: Target) -> None:
            store = _store(store_dir)
            inputs = store.inputs(carved_call)
            shown = flatten_outputs(call(*inputs))
            recorded = store.outputs(carved_call)
            if len(shown) != len(recorded) or not all(torch.equal(a, b) for a, b in zip(shown, recorded,
                                                                                        strict=False)):
                pytest.fail(f"the call in {call.__name__} does not reproduce carved op {carved_call} on the "
                            "reference (was it edited?)", pytrace=False)
            settings = _settings(rule or module.get("RULE", "bound"), tolerance or module.get("TOLERANCE", ""))
            result = run_local(store, tapml_target, settings.judge(tapml_target), carved_call)
            _judged(result, where(store, carved_call, tapml_target.name))

        return _named(test, call)

    return wrap


@functools.cache
def _units(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())["units"]


def carved_unit(number: int, *, id: str, rule: str | None = None, tolerance: str | None = None
                ) -> Callable[[Callable], Callable]:
    """Unit ``number`` of the test file's ``carved_units.json``: ``id`` names it (module path and call)."""

    def wrap(shown: Callable) -> Callable:
        module = shown.__globals__
        here = Path(module["__file__"])

        @pytest.mark.parametrize("carved_unit_call", [number], ids=[id])
        def test(carved_unit_call: int, tapml_target: Target) -> None:
            store = _store(str(here.with_name("carved_store")))
            entry = _units(str(here.with_name("carved_units.json")))[carved_unit_call]
            try:
                unit = UnitCall.from_json(entry["unit"])
                inputs, want = [store.load(s) for s in unit.inputs], [store.load(s) for s in entry["outputs"]]
                again = run_program(unit, inputs)
                why = "" if len(again) == len(want) and all(torch.equal(a, b) for a, b in zip(again, want,
                                                                                              strict=False)) \
                    else "different values"
            except Exception as e:  # an edited program that no longer runs: the same one-line failure
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if why:
                pytest.fail(f"unit {id} does not reproduce its carved outputs on the reference ({why}; was "
                            "carved_units.json edited?)", pytrace=False)
            settings = _settings(rule or module.get("RULE", "bound"), tolerance or module.get("TOLERANCE", ""))
            result = unit_alone(tapml_target, settings.judge(tapml_target), unit, inputs, want)
            first, end = entry["ops"]
            _judged(result, f"{unit.module or '(model)'} ({unit.cls}, call {unit.call}, carved ops [{first}, {end})) "
                            f"compiled as one unit on {tapml_target.name}")

        return _named(test, shown)

    return wrap

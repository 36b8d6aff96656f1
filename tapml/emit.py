"""Emitting carved-op tests a team commits into its own repository.

Each selected op is first replayed on the reference; only ops that reproduce
bit-exactly are emitted, with a subset store holding just the tensors they need
and a plain pytest file with one readable test per op (per signature, or per call
with ``all_calls``): the op call itself, named by its module path and call, run on
``$TAPML_PLATFORM`` (default torch-cpu) by ``tapml.emitted.carved_op``.

With ``units="modules"`` the tests are module units instead, as ``--plan top-down``
runs them: one per unique unit signature (per call with ``all_calls``), each
module call rebuilt as one program from the carved ops inside it
(``carved_units.json``, validated JSON, no code), its inputs and outputs in the
subset store, compiled whole on the target by ``tapml.emitted.carved_unit``.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import re
import textwrap
from collections import Counter
from pathlib import Path

import torch

from .callsource import call_source, tensor_names
from .carving import AtomicDir, FixtureStore, StoreWriter, replay
from .core import TapmlError, decode_value, encode
from .engine import carved_outputs, select_ops, select_units, skip_reason, unit_inputs
from .platforms import LocalTarget, get_platform, run_program

__all__ = ["emit_tests"]

_HEADER = '''"""Carved operator tests emitted by tapml from {source} on {date}.

Each test is one op call as the reference made it (the function body), fed the
carved inputs from carved_store/. It checks that the call reproduces the
reference's recorded output, then runs the op on $TAPML_PLATFORM (default
torch-cpu; any name `tapml platforms` lists, or FILE.py:Class) and judges it as
`tapml offload` does; a failure prints the worst elements and the bound or
tolerance with its origin. Run with plain pytest (tapml installed); select by
op or module path: pytest -k "gelu and layer.3".

Knobs: RULE (bound | tolerance | oracle) and TOLERANCE (as --tolerance:
"atol:1e-3,rtol:1e-3", "aten.gelu*=atol:1e-4,rtol:0", "module:encoder.*=rtol:1e-2"),
here, from TAPML_RULE / TAPML_TOLERANCE, or per test: @carved_op(..., tolerance=...).
"""

import os

import torch

from tapml.emitted import carved_op

RULE = os.environ.get("TAPML_RULE", "bound")
TOLERANCE = os.environ.get("TAPML_TOLERANCE", "")
'''

_TEST = '''

@carved_op({new}, id={id!r})  # op {index} of the carve, {source}
def test_{index:04d}_{name}({params}):
    return {call}
'''

_CONFTEST = '''"""The target the emitted tests run on: $TAPML_PLATFORM (default torch-cpu), in this process."""

import os

import pytest

from tapml.emitted import open_target

collect_ignore = ["carved_store"]  # data for the tests here, not a suite of its own


@pytest.fixture(scope="session")
def tapml_target():
    with open_target(os.environ.get("TAPML_PLATFORM", "torch-cpu")) as target:
        yield target
'''


_UNITS_HEADER = '''"""Carved module-unit tests emitted by tapml from {source} on {date}.

Each test is one module call as the reference ran it, rebuilt as one program from
the carved ops inside it (carved_units.json) and fed its carved inputs
(carved_store/). It checks that the program reproduces the reference's recorded
outputs, then compiles it whole on $TAPML_PLATFORM (default torch-cpu; any name
`tapml platforms` lists, or FILE.py:Class) and judges it as `tapml offload --plan
top-down` judges a unit alone: under the bound rule, against the float64 run of
the same program. Select by module path: pytest -k "layer.3".

Knobs: RULE (bound | tolerance | oracle) and TOLERANCE (as --tolerance), here,
from TAPML_RULE / TAPML_TOLERANCE, or per test: @carved_unit(..., tolerance=...).
"""

import os

from tapml.emitted import carved_unit

RULE = os.environ.get("TAPML_RULE", "bound")
TOLERANCE = os.environ.get("TAPML_TOLERANCE", "")
'''

_UNIT_TEST = '''

@carved_unit({new}, id={id!r})  # {cls}: carved ops [{first}, {end}), layer {layer} of the carve
def test_unit_{first:04d}_{name}():
    """{doc}"""
'''


def _test_source(store: FixtureStore, new: int, index: int) -> str:
    rec, op = store.ops[index], store.op_call(index)
    names = tensor_names(op)
    where = (rec["source"] or "unknown source").rsplit("/", 1)[-1]
    return _TEST.format(new=new, id=f"{rec['module'] or '(model)'}#{rec['call']}", index=index, source=where,
                        name=re.sub(r"\W", "_", rec["op"]), params=", ".join(names), call=call_source(op, names))


def emit_tests(store: FixtureStore, out: str | Path, *, only: str | None = None, all_calls: bool = False,
               force: bool = False, units: str = "ops") -> dict:
    """Write ``out/test_carved_ops.py``, ``out/conftest.py`` and ``out/carved_store`` (with ``units="modules"``,
    module-unit tests: ``emit_unit_tests``)."""
    if units == "modules":
        return emit_unit_tests(store, out, only=only, all_calls=all_calls, force=force)
    if units != "ops":
        raise TapmlError(f"--units {units}: choose ops or modules")
    candidates = [i for i in select_ops(store, all_calls=all_calls, only=only) if not skip_reason(store.ops[i])]
    report = replay(store, candidates)
    bad = {m.index: m.reason for m in report.mismatches}
    chosen = [i for i in candidates if i not in bad]
    with AtomicDir(out, force=force) as outdir:
        with StoreWriter(outdir.tmp / "carved_store") as writer:
            ops = []
            for new, i in enumerate(chosen):
                rec = store.ops[i]
                relink = lambda value: encode(decode_value(value, store.load), writer.add)  # noqa: E731
                ops.append(dict(rec, index=new, carved_index=i, layer=None, step=0, seq=new,
                                args=relink(rec["args"]), kwargs=relink(rec["kwargs"]),
                                outputs=relink(rec["outputs"])))
            writer.commit({
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "versions": store.manifest["versions"], "model": store.manifest["model"],
                "options": {"subset_of": str(store.path), "only": only, "all_calls": all_calls},
                "truncated": None, "stats": {"bytes_stored": writer.bytes_stored,
                                             "bytes_referenced": writer.bytes_referenced},
                "steps": [{"index": 0, "name": "emitted", "ops": [0, len(ops)]}], "layers": [], "ops": ops,
            })
        header = _HEADER.format(source=store.path, date=datetime.date.today().isoformat())
        tests = "".join(_test_source(store, new, i) for new, i in enumerate(chosen))
        (outdir.tmp / "test_carved_ops.py").write_text(header + tests)
        (outdir.tmp / "conftest.py").write_text(_CONFTEST)
        path = outdir.commit()
    return {"path": str(path), "emitted": len(chosen), "not_reproducible": bad,
            "skipped_by_design": len(select_ops(store, all_calls=all_calls, only=only)) - len(candidates)}


def _reproduces(unit, inputs: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
    """Why the unit's program does not give the carved outputs on the reference (None: bit-exact)."""
    got = run_program(unit, inputs)
    if len(got) != len(want):
        return f"{len(got)} outputs, {len(want)} carved"
    bad = [k for k, (g, w) in enumerate(zip(got, want, strict=True)) if not torch.equal(g, w)]
    return f"output {bad[0]} differs from the carved one" if bad else None


def _unit_source(new: int, unit, span) -> str:
    ops = Counter(n["op"] for n in unit.nodes)
    listed = ", ".join(f"{n} {op}" for op, n in ops.most_common(6)) + (", …" if len(ops) > 6 else "")
    return _UNIT_TEST.format(new=new, id=f"{unit.module or '(model)'}#{unit.call}", cls=unit.cls, first=span.first,
                             end=span.end, layer=span.layer, name=re.sub(r"\W", "_", unit.cls),
                             doc=textwrap.fill(f"{unit.module or '(model)'} ({unit.cls}) compiled whole: "
                                               f"{len(unit.nodes)} ops ({listed}).", 110,
                                               subsequent_indent="    "))


def emit_unit_tests(store: FixtureStore, out: str | Path, *, only: str | None = None, all_calls: bool = False,
                    force: bool = False) -> dict:
    """Write ``out/test_carved_units.py``, ``out/carved_units.json``, ``out/conftest.py`` and
    ``out/carved_store``: the units a top-down run compiles (the plan as on torch-cpu, where every
    module call that is a program compiles); ``only`` is a glob on the module path."""
    with LocalTarget(get_platform("torch-cpu")) as reference:
        units, layers = select_units(store, reference, all_calls=all_calls)
    layers = [x for x in layers if not only or fnmatch.fnmatchcase(units.built[x][0].module, only)]
    bad, chosen = {}, []
    with AtomicDir(out, force=force) as outdir:
        with StoreWriter(outdir.tmp / "carved_store") as writer:
            for layer in layers:
                unit, span = units.built[layer]
                inputs, want = unit_inputs(store, unit), carved_outputs(store, span)
                why = _reproduces(unit, inputs, want)
                if why:
                    bad[unit.module or "(model)"] = why
                    continue
                entry = dict(unit.to_json(), inputs=[writer.add(t) for t in inputs])
                chosen.append({"id": f"{unit.module or '(model)'}#{unit.call}", "unit": entry,
                               "outputs": [writer.add(t) for t in want], "layer": layer, "ops": [span.first, span.end],
                               "source": _unit_source(len(chosen), unit, span)})
            writer.commit({
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "versions": store.manifest["versions"], "model": store.manifest["model"],
                "options": {"subset_of": str(store.path), "only": only, "all_calls": all_calls, "units": "modules"},
                "truncated": None, "stats": {"bytes_stored": writer.bytes_stored,
                                             "bytes_referenced": writer.bytes_referenced},
                "steps": [{"index": 0, "name": "emitted", "ops": [0, 0]}], "layers": [], "ops": [],
            })
        header = _UNITS_HEADER.format(source=store.path, date=datetime.date.today().isoformat())
        (outdir.tmp / "test_carved_units.py").write_text(header + "".join(c.pop("source") for c in chosen))
        (outdir.tmp / "carved_units.json").write_text(json.dumps({"units": chosen}, separators=(",", ":")))
        (outdir.tmp / "conftest.py").write_text(_CONFTEST)
        path = outdir.commit()
    return {"path": str(path), "emitted": len(chosen), "not_reproducible": bad, "skipped_by_design": 0}

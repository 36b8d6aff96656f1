"""Emitting carved-op tests a team commits into its own repository.

Each selected op is first replayed on the reference; only ops that reproduce
bit-exactly are emitted, with a subset store holding just the tensors they need
and a plain pytest file with one readable test per op (per signature, or per call
with ``all_calls``): the op call itself, named by its module path and call, run on
``$TAPML_PLATFORM`` (default torch-cpu) by ``tapml.emitted.carved_op``.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from .callsource import call_source, tensor_names
from .carving import AtomicDir, FixtureStore, StoreWriter, replay
from .core import decode_value, encode
from .engine import select_ops, skip_reason

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

collect_ignore = ["carved_store"]  # data for test_carved_ops.py, not a suite of its own


@pytest.fixture(scope="session")
def tapml_target():
    with open_target(os.environ.get("TAPML_PLATFORM", "torch-cpu")) as target:
        yield target
'''


def _test_source(store: FixtureStore, new: int, index: int) -> str:
    rec, op = store.ops[index], store.op_call(index)
    names = tensor_names(op)
    where = (rec["source"] or "unknown source").rsplit("/", 1)[-1]
    return _TEST.format(new=new, id=f"{rec['module'] or '(model)'}#{rec['call']}", index=index, source=where,
                        name=re.sub(r"\W", "_", rec["op"]), params=", ".join(names), call=call_source(op, names))


def emit_tests(store: FixtureStore, out: str | Path, *, only: str | None = None, all_calls: bool = False,
               force: bool = False) -> dict:
    """Write ``out/test_carved_ops.py``, ``out/conftest.py`` and ``out/carved_store``."""
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

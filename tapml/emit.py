"""Emitting carved-op tests a team commits into its own repository.

Each selected op is first replayed on the reference; only ops that reproduce
bit-exactly are emitted, with a subset store holding just the tensors they need
and a plain pytest file that runs them on ``$TAPML_PLATFORM`` (default torch-cpu).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from .carving import AtomicDir, FixtureStore, StoreWriter, replay
from .core import decode_value, encode
from .engine import select_ops, skip_reason

__all__ = ["emit_tests"]

_TEST_FILE = '''"""Carved operator tests emitted by tapml from {source} on {date}.

Run them with plain pytest (tapml installed); TAPML_PLATFORM picks the target
(default torch-cpu; any name `tapml platforms` lists, or FILE.py:Class).
"""

import os
from pathlib import Path

import pytest

from tapml.carving import FixtureStore
from tapml.engine import run_local
from tapml.settings import Settings

STORE = FixtureStore(Path(__file__).with_name("carved_store"))
SETTINGS = Settings(platform=os.environ.get("TAPML_PLATFORM", "torch-cpu"), in_process=True)
OPS = {ops!r}


@pytest.fixture(scope="module")
def target():
    target = SETTINGS.open_target()
    yield target
    target.close()


@pytest.mark.parametrize("index", [i for i, _ in OPS], ids=[name for _, name in OPS])
def test_carved_op(index, target):
    result = run_local(STORE, target, SETTINGS.judge(target), index)
    if result.status in ("unsupported", "skipped"):
        pytest.skip(result.reason)
    local = result.local
    assert result.status == "ok", (
        f"{{result.op}} in {{result.module}}: {{result.status}}: max abs {{local and local.max_abs}} "
        f"({{(local and local.why) or result.reason}}); tolerance {{local and local.tolerance}}"
    )
'''

_CONFTEST = '''# the subset store is data for test_carved_ops.py, not a suite of its own
collect_ignore = ["carved_store"]
'''


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
        names = [(new, f"{i:04d}-{store.ops[i]['op']}[{store.ops[i]['module'] or '(model)'}]")
                 for new, i in enumerate(chosen)]
        (outdir.tmp / "test_carved_ops.py").write_text(_TEST_FILE.format(
            source=store.path, date=datetime.date.today().isoformat(), ops=names))
        (outdir.tmp / "conftest.py").write_text(_CONFTEST)
        path = outdir.commit()
    return {"path": str(path), "emitted": len(chosen), "not_reproducible": bad,
            "skipped_by_design": len(select_ops(store, all_calls=all_calls, only=only)) - len(candidates)}

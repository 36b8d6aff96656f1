"""A standalone repro of one carved op: its inputs (safetensors) and a short script that calls it.

Like the accuracy minifier's ``repro.py`` and Polygraphy's ``--gen-script``: the
script loads the op's recorded inputs, calls the op directly
(``torch.ops.aten.gelu.default(x)``) on the named platform — plain torch for
``torch-cpu``, ``tapml.platforms.open_local`` otherwise — and checks the result
against the reference's recorded output with ``torch.testing.assert_close`` and
tapml's judge (the run's rule: the error bound by default). Exit 0 within bounds,
1 when the target diverges.
"""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch

from .callsource import call_source, tensor_names
from .carving import AtomicDir, FixtureStore, TensorRef
from .core import TapmlError, iter_specs
from .judging import Judge
from .record import Tolerance

__all__ = ["write_repro", "platform_spec"]

_SCRIPT = '''"""Repro: {op} in {module} (call {call}), op {index} of {store}.

Carved at {source}. Run `python {script} [PLATFORM]` (default {platform});
torch-cpu is plain torch; another platform opens through tapml.platforms, and tapml's
judge decides. Exit 0 within tapml's bound ({rule} rule), 1 when it diverges.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tapml.core import OpCall  # the op as a platform receives it (op.json)
from tapml.judging import Judge, ToleranceTable  # tapml's judgement: the error bound

HERE = Path(__file__).resolve().parent
PLATFORM = sys.argv[1] if len(sys.argv) > 1 else {platform!r}
ATOL, RTOL = {atol!r}, {rtol!r}  # {origin}
RULE, COMPUTE_DTYPE = {rule!r}, {compute_dtype!r}
LIVE = {live!r}  # outputs a later op reads or the model returns: only these decide

saved = load_file(HERE / "inputs.safetensors")
{loads}
inputs = [{inputs}]
expected = list(load_file(HERE / "expected.safetensors").values())  # what the reference returned
op = OpCall.loads((HERE / "op.json").read_text())


def call({params}):
    return {call_text}


if PLATFORM == "torch-cpu":
    out = call(*inputs)
    got = list(out) if isinstance(out, (list, tuple)) else [out]
else:
    from tapml.platforms import open_local

    with open_local(PLATFORM) as target:
        got = target.execute(op, inputs)

for i, (g, e) in enumerate(zip(got, expected)):
    if not LIVE[i]:
        continue
    try:
        torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)
        print(f"output {{i}}: assert_close(atol={{ATOL:g}}, rtol={{RTOL:g}}) passes")
    except AssertionError as err:
        print(f"output {{i}}: assert_close(atol={{ATOL:g}}, rtol={{RTOL:g}}) fails: {{err}}")

judge = Judge(ToleranceTable.build([f"atol:{{ATOL}},rtol:{{RTOL}}"]), COMPUTE_DTYPE, RULE)
m = judge.judge(op, got, expected, inputs, live=LIVE)
bound = f"; {{m.bound.ratio:.3g}}x the error bound ({{m.bound.form}})" if m.bound else ""
print(f"tapml ({{RULE}} rule) on {{PLATFORM}}: {{'ok' if m.ok else 'divergent'}}{{bound}}"
      + (f" - {{m.why}}" if m.why else ""))
sys.exit(0 if m.ok else 1)
'''


def platform_spec(name: str) -> str:
    """A platform name as a script run from any directory can open it (``FILE.py:Class`` made absolute)."""
    path, sep, cls = name.rpartition(":")
    if sep and path.endswith(".py"):
        return f"{os.path.abspath(path)}:{cls}"
    return name


def _loads(store: FixtureStore, refs: list[TensorRef], names: list[str]) -> tuple[list[str], dict]:
    """Lines that rebuild each input with its recorded layout, and the tensors to save for them."""
    lines, saved = [], {}
    for name, ref in zip(names, refs, strict=True):
        t = store.load(ref)
        if t.is_contiguous() and t.storage_offset() == 0:
            saved[name] = t
            lines.append(f'{name} = saved["{name}"]')
        else:  # a transposed weight, a slice: the storage, viewed as the op saw it
            saved[f"{name}.storage"] = store.flat(ref.key)
            lines.append(f'{name} = torch.as_strided(saved["{name}.storage"], {tuple(ref.shape)}, '
                         f'{tuple(ref.stride)}, {ref.offset})')
    return lines, saved


def write_repro(store: FixtureStore, index: int, out: str | os.PathLike, *, platform: str = "torch-cpu",
                rule: str = "bound", compute_dtype: str | None = None, tolerance: Tolerance | None = None,
                force: bool = False) -> Path:
    """Write ``out/repro.py``, ``out/inputs.safetensors``, ``out/expected.safetensors`` and ``out/op.json``."""
    if not 0 <= index < len(store.ops):
        raise TapmlError(f"op {index}: the store has ops 0..{len(store.ops) - 1}")
    rec, op = store.ops[index], store.op_call(index)
    names = tensor_names(op)
    lines, saved = _loads(store, [TensorRef.from_json(r) for r in iter_specs([op.args, op.kwargs])], names)
    tol = tolerance or Judge(compute_dtype=compute_dtype, rule=rule).tolerance(op)
    script = _SCRIPT.format(
        op=rec["op"], module=rec["module"] or "(model)", call=rec["call"], index=index, store=store.path,
        source=rec["source"] or "an unknown line", script="repro.py", platform=platform_spec(platform),
        atol=tol.atol, rtol=tol.rtol, origin=f"tolerance: {tol.origin}", rule=rule, compute_dtype=compute_dtype,
        live=[store.graph.live(index, k) for k in range(len(op.output_specs))], loads="\n".join(lines),
        inputs=", ".join(names), params=", ".join(names), call_text=call_source(op, names))
    with AtomicDir(out, force=force) as outdir:
        safetensors.torch.save_file({k: v.contiguous() for k, v in saved.items()},
                                    str(outdir.tmp / "inputs.safetensors"))
        safetensors.torch.save_file({f"output{k}": t.contiguous() for k, t in enumerate(store.outputs(index))},
                                    str(outdir.tmp / "expected.safetensors"))
        (outdir.tmp / "op.json").write_text(op.dumps() + "\n")
        (outdir.tmp / "repro.py").write_text(script)
        return outdir.commit()

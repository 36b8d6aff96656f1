"""Every attention call of a store on each SDPA backend, in each dtype, against the carved reference and float64.

Why: serving engines depend on fused attention kernels (flash, memory-efficient) whose numerics
differ from the math path by design. Each carved ``scaled_dot_product_attention`` call (its
recorded q, k, v, mask, scale) is run with one backend forced (``torch.nn.attention.sdpa_kernel``)
in float16, bfloat16 and float32, and judged by the attention bound of ``tapml.judging`` for that
dtype (inputs rounded to it first, so the bound measures the kernel, not the rounding of its
inputs): within it, a correct kernel; beyond it, the call is named with its worst element. A
backend that refuses a dtype or shape is ``unsupported`` with PyTorch's one-line reason.

``python -m tapml.attention_check STORE... [--device cuda] [--backends flash,efficient,math]
[--dtypes float16,bfloat16,float32] [-o DIR]`` prints the table and writes ``attention.json`` and
``attention.md`` (``scripts/gpu-check`` runs it on CUDA; on a CPU the math and flash backends run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tapml.carving import FixtureStore
from tapml.core import TapmlError, bind_args
from tapml.judging import op_bounds, unit_roundoff

__all__ = ["SDPA_OPS", "BACKENDS", "AttentionCall", "CallResult", "attention_calls", "check_call", "check_stores",
           "summarize", "table"]

SDPA_OPS = frozenset({
    "aten.scaled_dot_product_attention.default", "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default", "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default", "aten._scaled_dot_product_attention_math.default"})
BACKENDS = ("flash", "efficient", "math")
DTYPES = ("float16", "bfloat16", "float32")
_ENUM = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH", "cudnn": "CUDNN_ATTENTION"}


@dataclass
class AttentionCall:
    """One carved attention call: where it is, its inputs as the op saw them, and the carved output."""

    store: str
    index: int
    module: str
    op: str
    inputs: list[torch.Tensor]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scale: float | None
    reference: torch.Tensor  # the carved output (the reference platform's result)


@dataclass
class CallResult:
    """One call on one backend in one dtype."""

    store: str
    index: int
    module: str
    backend: str
    dtype: str
    status: str  # ok | out-of-bounds | unsupported
    reason: str = ""
    max_abs_vs_reference: float | None = None  # against the carved (CPU, float32) output
    max_abs_vs_float64: float | None = None  # against the exact result on the dtype-rounded inputs
    bound_ratio: float | None = None  # max |got − exact| / bound: above 1 is out of bounds
    worst: dict = field(default_factory=dict)  # the element of the largest ratio: index, got, exact, bound


def attention_calls(store: FixtureStore) -> list[AttentionCall]:
    """Every SDPA call the store recorded, with its arguments decoded (positional or keyword)."""
    calls = []
    for rec in store.ops:
        if rec["op"] not in SDPA_OPS:
            continue
        op = store.op_call(rec["index"])
        inputs = store.inputs(rec["index"])
        args, kwargs = bind_args(op, inputs)
        public = rec["op"] == "aten.scaled_dot_product_attention.default"
        named = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale") if public else ("dropout_p", "is_causal"),
                         args[3:], strict=False))
        named.update(kwargs)
        if named.get("dropout_p"):
            continue  # random: no single right answer
        calls.append(AttentionCall(str(store.path), rec["index"], rec["module"], rec["op"], inputs, *args[:3],
                                   named.get("attn_mask"), bool(named.get("is_causal")), named.get("scale"),
                                   store.outputs(rec["index"])[0]))
    return calls


def _sdpa(call: AttentionCall, dtype: torch.dtype, device: str) -> torch.Tensor:
    mask = call.mask
    if mask is not None:
        mask = mask.to(device, dtype) if mask.is_floating_point() else mask.to(device)
    return F.scaled_dot_product_attention(call.q.to(device, dtype), call.k.to(device, dtype),
                                          call.v.to(device, dtype), attn_mask=mask, is_causal=call.causal,
                                          scale=call.scale)


def _exact(call: AttentionCall, dtype: torch.dtype) -> torch.Tensor:
    """The call in float64 on inputs first rounded to ``dtype`` (the math path on the CPU)."""
    rounded = AttentionCall(**{**call.__dict__, **{n: getattr(call, n).to(dtype).double() for n in ("q", "k", "v")},
                               "mask": call.mask.to(dtype).double() if call.mask is not None
                               and call.mask.is_floating_point() else call.mask})
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return _sdpa(rounded, torch.float64, "cpu")


def _bound(call: AttentionCall, exact: torch.Tensor, dtype: torch.dtype, store: FixtureStore) -> torch.Tensor:
    """The attention bound of ``tapml.judging`` for ``dtype``'s unit roundoff, on the rounded inputs."""
    rounded = [t.to(dtype).double() if t.is_floating_point() else t for t in call.inputs]
    (b, *_) = op_bounds(store.op_call(call.index), rounded, [exact], unit_roundoff(str(dtype)[6:]), [dtype])
    return b.tensor


def check_call(call: AttentionCall, store: FixtureStore, backend: str, dtype_name: str, device: str) -> CallResult:
    """One call with one backend forced, in one dtype: errors, the bound ratio, the worst element."""
    result = CallResult(call.store, call.index, call.module, backend, dtype_name, "unsupported")
    dtype = getattr(torch, dtype_name)
    try:
        with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, _ENUM[backend])), torch.no_grad():
            got = _sdpa(call, dtype, device).double().cpu()
    except (RuntimeError, NotImplementedError, ValueError) as e:  # no kernel for this dtype, shape or device
        result.reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return result
    exact = _exact(call, dtype)
    bound = _bound(call, exact, dtype, store).expand_as(exact)
    err = (got - exact).abs().nan_to_num(nan=math.inf)
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound.clamp(min=1e-300))
    worst = int(ratio.flatten().argmax())
    result.max_abs_vs_reference = float((got - call.reference.double()).abs().max())
    result.max_abs_vs_float64 = float(err.max())
    result.bound_ratio = float(ratio.flatten()[worst])
    where = list(torch.unravel_index(torch.tensor(worst), ratio.shape))
    result.worst = {"index": [int(i) for i in where], "got": float(got.flatten()[worst]),
                    "exact": float(exact.flatten()[worst]), "bound": float(bound.flatten()[worst])}
    result.status = "ok" if result.bound_ratio <= 1.0 else "out-of-bounds"
    return result


def check_stores(paths: list[str], *, device: str = "cuda", backends=BACKENDS, dtypes=DTYPES) -> list[CallResult]:
    """Every attention call of every store × backend × dtype (TF32 off: float32 means float32)."""
    matmul = torch.backends.cuda.matmul
    saved, matmul.allow_tf32 = matmul.allow_tf32, False
    try:
        results = []
        for path in paths:
            store = FixtureStore(path)
            for call in attention_calls(store):
                results += [check_call(call, store, b, d, device) for b in backends for d in dtypes]
        return results
    finally:
        matmul.allow_tf32 = saved


def summarize(results: list[CallResult]) -> list[dict]:
    """One row per backend × dtype: calls run and refused, worst errors, pass/fail, the first failing call."""
    rows = []
    for key in dict.fromkeys((r.backend, r.dtype) for r in results):
        rs = [r for r in results if (r.backend, r.dtype) == key]
        ran = [r for r in rs if r.status != "unsupported"]
        bad = next((r for r in ran if r.status == "out-of-bounds"), None)
        rows.append({
            "backend": key[0], "dtype": key[1], "calls": len(rs), "unsupported": len(rs) - len(ran),
            "max_abs_vs_reference": max((r.max_abs_vs_reference for r in ran), default=None),
            "max_abs_vs_float64": max((r.max_abs_vs_float64 for r in ran), default=None),
            "max_bound_ratio": max((r.bound_ratio for r in ran), default=None),
            "verdict": "unsupported" if not ran else ("fail" if bad else "pass"),
            "first_failure": None if bad is None else f"{Path(bad.store).name} op {bad.index} ({bad.module}): "
                                                      f"{bad.bound_ratio:.3g}× the bound at {bad.worst}",
            "reason": next((r.reason for r in rs if r.status == "unsupported"), "") if not ran else "",
        })
    return rows


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def table(rows: list[dict]) -> str:
    """The summary as a markdown table."""
    lines = ["| backend | dtype | calls | unsupported | max abs vs CPU reference | max abs vs float64 | "
             "max error / bound | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = r["verdict"] + (f": {r['first_failure']}" if r["first_failure"] else "") + \
            (f" ({r['reason']})" if r["reason"] else "")
        lines.append(f"| {r['backend']} | {r['dtype']} | {r['calls']} | {r['unsupported']} | "
                     f"{_num(r['max_abs_vs_reference'])} | {_num(r['max_abs_vs_float64'])} | "
                     f"{_num(r['max_bound_ratio'])} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every supported backend × dtype is within its bound, 1 when one is not, 2 on bad input."""
    p = argparse.ArgumentParser(prog="python -m tapml.attention_check", description=__doc__.split("\n\n")[0])
    p.add_argument("stores", nargs="+")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("-o", "--out")
    a = p.parse_args(argv)
    backends, dtypes = a.backends.split(","), a.dtypes.split(",")
    if bad := [b for b in backends if b not in _ENUM] + [d for d in dtypes if d not in (*DTYPES, "float64")]:
        print(f"attention_check: error: unknown backend or dtype {bad[0]!r}", file=sys.stderr)
        return 2
    try:
        results = check_stores(a.stores, device=a.device, backends=backends, dtypes=dtypes)
    except TapmlError as e:
        print(f"attention_check: error: {e}", file=sys.stderr)
        return 2
    rows = summarize(results)
    text = table(rows)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention.json").write_text(json.dumps({"device": a.device, "torch": torch.__version__, "rows": rows,
                                                        "calls": [asdict(r) for r in results]}, indent=1))
        (out / "attention.md").write_text(text + "\n")
    return 1 if any(r["verdict"] == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

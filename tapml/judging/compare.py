"""Numbers that explain a difference between a target's tensor and the reference's.

Every comparison records max abs and rel error, the fraction of elements outside
the tolerance, cosine similarity, SQNR, ULP distance, NaN/Inf counts on each
side and the worst elements, so a verdict can be read, not just trusted.
"""

from __future__ import annotations

import math

import torch

from tapml.record import Metrics, Tolerance, Worst

__all__ = ["compare", "compare_outputs", "has_nonfinite", "saturated", "rmse", "HISTOGRAM_EDGES"]

# element-error histogram bins: exact, then decades 1e-10 .. 1e4, then inf/NaN
HISTOGRAM_EDGES = [10.0**k for k in range(-10, 5)]

_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Float bits as integers whose order is the floats' order, for ULP distances."""
    bits = x.contiguous().view(_INT_VIEW[x.dtype]).long()
    width = x.element_size() * 8
    lowest = -(1 << (width - 1))
    return torch.where(bits < 0, lowest - bits, bits)


def has_nonfinite(t: torch.Tensor) -> bool:
    return bool(t.is_floating_point() and t.numel() and not torch.isfinite(t).all())


def saturated(t: torch.Tensor, dtype: str | None) -> int:
    """Elements at the largest finite magnitude of a reduced dtype (fp16 overflow's mark)."""
    if dtype not in ("float16", "bfloat16") or not t.is_floating_point() or not t.numel():
        return 0
    big = torch.finfo(getattr(torch, dtype)).max
    return int((t.abs().double() >= big).sum().item())


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.numel():
        return 0.0
    d = a.double() - b.double()
    d = d[torch.isfinite(d)]
    return math.sqrt(float((d * d).mean().item())) if d.numel() else float("inf")


def compare(got: torch.Tensor, want: torch.Tensor, tol: Tolerance, *, worst: int = 5) -> Metrics:
    """Metrics of ``got`` against ``want`` and whether it is within ``tol``."""
    return Metrics(**_compare(got, want, tol, worst))


def _as_real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts (a trailing dim of 2), compared as floats."""
    return torch.view_as_real(t.resolve_conj().to(torch.complex64 if t.dtype == torch.complex32 else t.dtype))


def _compare(got: torch.Tensor, want: torch.Tensor, tol: Tolerance, worst: int) -> dict:
    m: dict = {"tolerance": tol, "shape": list(want.shape), "dtype": str(want.dtype).removeprefix("torch.")}
    if want.is_complex() and got.shape == want.shape:
        real = _compare(_as_real(got.to(want.dtype)), _as_real(want), tol, worst)
        problem = f"dtype {str(got.dtype).removeprefix('torch.')} instead of {m['dtype']}" \
            if got.dtype != want.dtype else None
        return dict(real, shape=m["shape"], dtype=m["dtype"], **({"problem": problem, "ok": False} if problem else {}))
    if got.shape != want.shape:
        m.update(ok=False, problem=f"shape {list(got.shape)} instead of {list(want.shape)}",
                 max_abs=math.inf, mismatch_fraction=1.0)
        return m
    if got.dtype != want.dtype:
        m["problem"] = f"dtype {str(got.dtype).removeprefix('torch.')} instead of {m['dtype']}"
        got = got.to(want.dtype)
    elif torch.equal(got, want):  # the common case on a good target: skip the float64 work
        nan = int(torch.isnan(want).sum()) if want.is_floating_point() else 0
        inf = int(torch.isinf(want).sum()) if want.is_floating_point() else 0
        m.update(ok=True, exact=True, max_abs=0.0, max_rel=0.0, mismatch_fraction=0.0, mismatches=0, cosine=1.0,
                 sqnr_db=math.inf, max_ulp=0, nan=[nan, nan], inf=[inf, inf], worst=[])
        return m
    n = want.numel()
    if not (want.is_floating_point() or want.is_complex()):
        diff = (got.long() - want.long()).abs() if want.dtype != torch.bool else (got != want).long()
        bad = diff > 0
        m.update(exact=bool(not bad.any()), max_abs=float(diff.max().item()) if n else 0.0,
                 mismatch_fraction=float(bad.float().mean().item()) if n else 0.0)
        m["ok"] = m["exact"] and "problem" not in m
        m["worst"] = _worst(got, want, diff.double(), worst)
        return m
    g, w = got.double(), want.double()
    nan_g, nan_w = torch.isnan(g), torch.isnan(w)
    inf_g, inf_w = torch.isinf(g), torch.isinf(w)
    m.update(nan=[int(nan_g.sum()), int(nan_w.sum())], inf=[int(inf_g.sum()), int(inf_w.sum())])
    same = (g == w) | (nan_g & nan_w)
    diff = (g - w).abs().masked_fill(same, 0.0).nan_to_num(nan=math.inf, posinf=math.inf)
    allowed = tol.atol + tol.rtol * w.abs()
    bad = diff > allowed.nan_to_num(nan=0.0)
    rel = (diff / w.abs()).masked_fill(same, 0.0).nan_to_num(nan=math.inf, posinf=math.inf)
    finite = torch.isfinite(g) & torch.isfinite(w)
    gf, wf = g[finite], w[finite]
    err2 = float(((gf - wf) ** 2).sum().item()) if gf.numel() else 0.0
    sig2 = float((wf**2).sum().item()) if wf.numel() else 0.0
    norm = math.sqrt(float((gf**2).sum().item()) * sig2) if gf.numel() else 0.0
    m.update(
        max_abs=float(diff.max().item()) if n else 0.0,
        max_rel=float(rel.max().item()) if n else 0.0,
        mismatch_fraction=float(bad.double().mean().item()) if n else 0.0,
        mismatches=int(bad.sum().item()),
        cosine=(float((gf * wf).sum().item()) / norm) if norm else (1.0 if err2 == 0 else 0.0),
        sqnr_db=(10 * math.log10(sig2 / err2)) if err2 and sig2 else (-math.inf if err2 else math.inf),
        max_ulp=int((_ordered(got) - _ordered(want)).abs().masked_fill(same | ~finite, 0).max().item())
        if n and want.dtype in _INT_VIEW else None,
    )
    m["ok"] = not bool(bad.any()) and "problem" not in m
    m["worst"] = _worst(got, want, diff, worst)
    m["histogram"] = _histogram(diff)
    return m


def _histogram(diff: torch.Tensor) -> list[int]:
    """Counts of element errors: [exact, <1e-10, 1e-10..1e-9, ..., 1e3..1e4, >=1e4 finite, inf/NaN]."""
    flat = diff.reshape(-1)
    finite = flat[torch.isfinite(flat)]
    exact = int((finite == 0).sum())
    nonzero = finite[finite > 0]
    edges = torch.tensor(HISTOGRAM_EDGES, dtype=nonzero.dtype)
    counts = torch.bincount(torch.bucketize(nonzero, edges), minlength=len(HISTOGRAM_EDGES) + 1)
    return [exact, *counts.tolist(), int(flat.numel() - finite.numel())]


def _worst(got: torch.Tensor, want: torch.Tensor, diff: torch.Tensor, k: int) -> list[Worst]:
    if not diff.numel() or k <= 0:
        return []
    flat = diff.reshape(-1)
    top = torch.topk(flat, min(k, flat.numel()))
    rows = []
    for value, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        if value == 0:
            break
        index = list(torch.unravel_index(torch.tensor(i), want.shape)) if want.dim() else []
        rows.append(Worst([int(x) for x in index], _num(want.reshape(-1)[i]), _num(got.reshape(-1)[i]), value))
    return rows


def _num(x: torch.Tensor):
    v = x.item()
    return v if not isinstance(v, float) or math.isfinite(v) else repr(v)


def compare_outputs(got: list[torch.Tensor], want: list[torch.Tensor], tol: Tolerance) -> Metrics:
    """All outputs of one op: the worst output's metrics, plus how many outputs were compared."""
    if len(got) != len(want):
        return Metrics(ok=False, problem=f"{len(got)} outputs instead of {len(want)}", max_abs=math.inf,
                       mismatch_fraction=1.0, tolerance=tol)
    results = [compare(g, w, tol) for g, w in zip(got, want, strict=True)]
    if not results:
        return Metrics(ok=True, max_abs=0.0, mismatch_fraction=0.0, tolerance=tol)
    worst = max(range(len(results)), key=lambda i: (not results[i].ok, results[i].max_abs))
    out = results[worst]
    out.ok = all(r.ok for r in results)
    if len(results) > 1:
        out.output, out.outputs = worst, len(results)
    return out

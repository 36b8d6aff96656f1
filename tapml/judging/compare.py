"""Numbers that explain a difference between a target's tensor and the reference's.

Every comparison records max abs and rel error, the fraction of elements outside
the tolerance, cosine similarity, SQNR, ULP distance, NaN/Inf counts on each
side and the worst elements, so a verdict can be read, not just trusted.

Honest by construction: a NaN or Inf is a mismatch unless the reference has the
same non-finite value at that element, and then cosine, SQNR and ULP distance say
so (NaN) instead of scoring the finite rest; a wrong shape or dtype is a problem
of its own kind with assert_close-style wording, never an "inf" error. Two tiers:
the cheap check (max abs, the tolerance) runs for every op; the full metric set
only when asked (an op out of bounds, a report).

The cheap tier is on the critical path of a per-op offload (every offloaded op's
outputs are judged), so it runs on NumPy views of the CPU tensors (one vectorized
pass each, a fraction of torch's per-call cost on small tensors) and reads the
carved side's NaN/Inf counts from ``carved.py``'s cache; whatever it cannot decide
(non-finite values, out of tolerance, a dtype NumPy lacks) takes the torch path,
whose numbers it reproduces exactly.
"""

from __future__ import annotations

import math

import torch

from tapml.core import content_mark, dtype_name
from tapml.record import Metrics, Tolerance, Worst

from .carved import arrays, nonfinite_counts, np

__all__ = ["compare", "has_nonfinite", "saturated", "rmse", "chunks", "CHUNK", "HISTOGRAM_EDGES", "output_label",
           "as_real"]

CHUNK = 1 << 16  # elements judged at once in float64: a large output's temporaries stay ~512 KiB each (the full
# metric set holds about a dozen at once: with 2¹⁸, ~25 MiB on top of a 1.1B bfloat16 offload's working set)

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
    """Root mean square difference; inf when non-finite values differ (in float64, ``CHUNK`` elements at a
    time for a large tensor)."""
    if not a.numel():
        return 0.0
    if a.numel() <= CHUNK:
        d = _differences(a, b)
        return math.sqrt(float((d * d).mean().item())) if d is not None else math.inf
    total = 0.0
    for a_part, b_part in chunks(a, b):
        d = _differences(a_part, b_part)
        if d is None:
            return math.inf
        total += float((d * d).sum().item())
    return math.sqrt(total / a.numel())


def _differences(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a − b in float64, 0 where both hold the same value (NaN included); None where a non-finite differs."""
    a, b = a.double(), b.double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    d = (a - b).masked_fill(same, 0.0)
    return d if torch.isfinite(d).all() else None


def chunks(*tensors):
    """The tensors (or NumPy arrays) of one shape, or broadcast to the first's, flattened, ``CHUNK``
    elements at a time."""
    shape = tensors[0].shape
    flat = [(t if t.shape == shape else torch.broadcast_to(t, shape)).reshape(-1) for t in tensors]
    for start in range(0, flat[0].shape[0], CHUNK):
        yield tuple(f[start:start + CHUNK] for f in flat)


def as_real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts (a trailing dim of 2), compared as floats."""
    return torch.view_as_real(t.resolve_conj().to(torch.complex64 if t.dtype == torch.complex32 else t.dtype))


def output_label(index: int, name: str = "", count: int = 1) -> str:
    """``output 1 (mean)`` — how every message names the output it is about."""
    if count <= 1 and not name:
        return "the output"
    return f"output {index}" + (f" ({name})" if name else "")


def compare(got: torch.Tensor, want: torch.Tensor, tol: Tolerance, *, worst: int = 5, full: bool = True,
            label: str = "the output") -> Metrics:
    """Metrics of ``got`` against ``want`` and whether it is within ``tol`` (``full``: every metric)."""
    m = Metrics(ok=False, tolerance=tol, shape=list(want.shape), dtype=dtype_name(want.dtype))
    if got.shape != want.shape:
        m.problem_kind, m.max_abs, m.mismatch_fraction = "shape", None, 1.0
        m.problem = f"{label}: shape {list(got.shape)} ≠ expected {list(want.shape)}"
        return m
    if got.dtype != want.dtype:
        m.problem_kind = "dtype"
        m.problem = f"{label}: dtype {dtype_name(got.dtype)} ≠ expected {dtype_name(want.dtype)}"
        got = got.to(want.dtype)
    mark = None
    if want.is_complex():
        got, want = as_real(got), as_real(want)
    else:
        mark = content_mark(want)  # a carved tensor read from the store: its NaN/Inf counts are cached
    pair = arrays(got, want)
    # one tensor on both sides (a target's output that holds the carved bytes): equal unless it holds a NaN
    if (got is want and not nonfinite_counts(want, pair[1] if pair is not None else None, mark)[0]) or (
            bool((pair[0] == pair[1]).all()) if pair is not None else torch.equal(got, want)):  # a good target's
        _exact(m, want, pair, mark)
        m.ok = m.problem is None
        return m
    if not want.is_floating_point():
        _integers(m, got, want, worst)
        return m
    if full or pair is None or m.problem is not None or not _within(m, pair, tol, want, mark):
        _floats(m, got, want, tol, worst, full)
    return m


def _within(m: Metrics, pair, tol: Tolerance, want: torch.Tensor, mark) -> bool:
    """The cheap tier in one float64 pass (a chunk at a time over ``CHUNK`` elements): True (``m`` filled as
    ``_floats`` fills it) when every element is finite and within ``tol``; False when the torch path must
    decide (and explain)."""
    got_np, want_np = pair
    if want_np.dtype == np.float64 or nonfinite_counts(want, want_np, mark) != (0, 0):
        return False  # float64: its differences can round and overflow, the torch path keeps its warnings off
    top = 0.0  # a chunk at a time: the same maximum, the same verdict, two float64 arrays of CHUNK elements
    for g_part, w_part in [pair] if want_np.size <= CHUNK else chunks(got_np, want_np):
        t = _top_within(g_part, w_part, tol)
        if t is None:
            return False
        top = max(top, t)
    m.nan, m.inf, m.nonfinite_mismatches = [0, 0], [0, 0], 0
    m.max_abs, m.mismatches, m.mismatch_fraction, m.ok = top, 0, 0.0, True
    return True


def _top_within(got_np, want_np, tol: Tolerance) -> float | None:
    """max |got − want| in float64 when every element is finite and within ``tol``, else None."""
    if want_np.dtype == np.float32 and _TINY < tol.atol < 1e30 and tol.rtol >= 0:
        top = _top_within_float32(got_np, want_np, tol)
        if top is not _UNSURE:
            return top
    diff = np.empty(want_np.shape)  # float64; exact differences for float16/32, as .double() − .double()
    np.abs(np.subtract(got_np, want_np, out=diff, dtype=np.float64), out=diff)
    top = float(diff.max()) if diff.size else 0.0
    if not math.isfinite(top):  # a NaN/Inf on the target's side: counted and located by the torch path
        return None
    if top > tol.atol:  # the bound atol + rtol·|want| is ≥ atol: only past it are elements counted
        bound = np.abs(want_np, dtype=np.float64)
        bound *= tol.rtol
        bound += tol.atol
        if np.count_nonzero(diff > bound):
            return None
    return top


_UNSURE = object()
_TINY = 2.0**-100  # below it a float32 difference may be a flushed subnormal: the float64 pass decides
_MARGIN = 1 - 2.0**-16  # far wider than a float32 rounding (2⁻²⁴ relative)


def _top_within_float32(got_np, want_np, tol: Tolerance):
    """``_top_within``'s result from a float32 pass, the float64 differences taken only where they can
    decide it; ``_UNSURE`` where the float64 pass must run.

    Why it is the same number: a float32 subtraction rounds the exact difference once, and rounding is
    monotone, so the element of the largest float64 difference is among those of the largest float32
    one, and an element past ``atol`` in float64 is past ``atol·(1 − 2⁻¹⁶)`` in float32. Those few are
    recomputed exactly as the float64 pass computes them (17 µs against 23 on a 27k-element output)."""
    rough = np.empty(want_np.shape, np.float32)
    with np.errstate(over="ignore"):  # a finite difference past float32's range: inf here, the float64 pass's
        np.abs(np.subtract(got_np, want_np, out=rough), out=rough)
    largest = float(rough.max()) if rough.size else 0.0
    if not _TINY <= largest < math.inf:  # a NaN/Inf, an overflow, or differences too small to trust
        return _UNSURE
    top = float(_exact_diff(got_np, want_np, np.flatnonzero(rough == largest)).max())
    if top > tol.atol:
        near = np.flatnonzero(rough > tol.atol * _MARGIN)
        bound = np.abs(want_np.flat[near], dtype=np.float64)
        bound *= tol.rtol
        bound += tol.atol
        if np.count_nonzero(_exact_diff(got_np, want_np, near) > bound):
            return None
    return top


def _exact_diff(got_np, want_np, where):
    """|got − want| in float64 at the flat indices ``where``, as the float64 pass computes it."""
    diff = np.subtract(got_np.flat[where], want_np.flat[where], dtype=np.float64)
    return np.abs(diff, out=diff)


def _exact(m: Metrics, want: torch.Tensor, pair, mark) -> None:
    nan, inf = nonfinite_counts(want, pair[1] if pair is not None else None, mark)
    m.exact, m.max_abs, m.max_rel, m.mismatch_fraction, m.mismatches = True, 0.0, 0.0, 0.0, 0
    m.cosine, m.sqnr_db, m.max_ulp, m.nan, m.inf, m.worst = 1.0, math.inf, 0, [nan, nan], [inf, inf], []


def _integers(m: Metrics, got: torch.Tensor, want: torch.Tensor, worst: int) -> None:
    n = want.numel()
    diff = (got.long() - want.long()).abs() if want.dtype != torch.bool else (got != want).long()
    bad = diff > 0
    m.exact = bool(not bad.any())
    m.max_abs = float(diff.max().item()) if n else 0.0
    m.mismatch_fraction = float(bad.float().mean().item()) if n else 0.0
    m.mismatches = int(bad.sum().item())
    m.ok = m.exact and m.problem is None
    m.worst = _worst(got, want, diff.double(), worst)


def _floats(m: Metrics, got: torch.Tensor, want: torch.Tensor, tol: Tolerance, worst: int, full: bool) -> None:
    """The torch path, in float64. A tensor over ``CHUNK`` elements is judged a chunk at a time (at 1B
    parameters a bfloat16 target's logits made ~8 float64 copies at once, +200 MiB); every figure is a
    count, a maximum or a sum over elements, so the chunks' combine (sums to the last bits)."""
    n = want.numel()
    parts = [(got, want)] if n <= CHUNK else list(chunks(got, want))
    nan, inf, nonfinite, top, bad = [0, 0], [0, 0], 0, 0.0, 0
    one = None  # a single part's float64 pass, kept for the full metrics
    for g_part, w_part in parts:
        one = _float_diff(g_part, w_part)
        g, w, same, nonfinite_bad, diff, counts = one
        nan, inf = [nan[0] + counts[0], nan[1] + counts[1]], [inf[0] + counts[2], inf[1] + counts[3]]
        nonfinite += int(nonfinite_bad.sum())
        top = max(top, float(diff.max().item()) if diff.numel() else 0.0)
        bad += int(((diff > (tol.atol + tol.rtol * w.abs()).nan_to_num(nan=0.0, posinf=math.inf))
                    | nonfinite_bad).sum().item())
    m.nan, m.inf, m.nonfinite_mismatches = nan, inf, nonfinite
    m.max_abs, m.mismatches = top, bad
    m.mismatch_fraction = m.mismatches / n if n else 0.0
    m.ok = not m.mismatches and m.problem is None
    if not (full or not m.ok):
        return
    sums, rel, ulp, candidates, histogram = [0.0, 0.0, 0.0, 0.0], 0.0, 0, [], None
    ulps = bool(n and want.dtype in _INT_VIEW)
    for k, (g_part, w_part) in enumerate(parts):
        g, w, same, nonfinite_bad, diff, _ = one if len(parts) == 1 else _float_diff(g_part, w_part)
        rel = max(rel, float((diff / w.abs()).masked_fill(same, 0.0).nan_to_num(nan=math.inf, posinf=math.inf)
                             .max()) if diff.numel() else 0.0)
        if not m.nonfinite_mismatches:
            finite = torch.isfinite(g) & torch.isfinite(w)
            gf, wf = g[finite], w[finite]
            for j, term in enumerate(((gf - wf) ** 2, wf**2, gf**2, gf * wf)):
                sums[j] += float(term.sum().item()) if gf.numel() else 0.0
            if ulps:
                ulp = max(ulp, int((_ordered(g_part) - _ordered(w_part)).abs().masked_fill(~finite | same, 0).max()
                                   .item()) if g_part.numel() else 0)
        candidates += [(v, k * CHUNK + i) for v, i in _top(diff, worst)]
        counts = _histogram(diff)
        histogram = counts if histogram is None else [a + b for a, b in zip(histogram, counts, strict=True)]
    m.max_rel = rel if n else 0.0
    if m.nonfinite_mismatches:  # a score over the finite rest would hide the problem: say there is none
        m.cosine, m.sqnr_db, m.max_ulp = math.nan, math.nan, None
    else:
        err2, sig2, gsq, cross = sums
        norm = math.sqrt(gsq * sig2)
        m.cosine = (cross / norm) if norm else (1.0 if err2 == 0 else math.nan)
        m.sqnr_db = (10 * math.log10(sig2 / err2)) if err2 and sig2 else (-math.inf if err2 else math.inf)
        m.max_ulp = ulp if ulps else None
    m.worst = _worst_of(got, want, sorted(candidates, key=lambda c: -c[0])[:worst] if len(parts) > 1 else candidates)
    m.histogram = histogram


def _float_diff(got: torch.Tensor, want: torch.Tensor) -> tuple:
    """(got and want in float64, where they agree, non-finite disagreements, |difference|, NaN/Inf counts)."""
    g, w = got.double(), want.double()
    nan_g, nan_w, inf_g, inf_w = torch.isnan(g), torch.isnan(w), torch.isinf(g), torch.isinf(w)
    same = (g == w) | (nan_g & nan_w)  # the same non-finite value on both sides matches
    nonfinite_bad = ~same & (nan_g | nan_w | inf_g | inf_w)
    diff = (g - w).abs().masked_fill(same, 0.0).masked_fill(nonfinite_bad, math.inf)
    counts = (int(nan_g.sum()), int(nan_w.sum()), int(inf_g.sum()), int(inf_w.sum()))
    return g, w, same, nonfinite_bad, diff, counts


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
    return _worst_of(got, want, _top(diff, k))


def _top(diff: torch.Tensor, k: int) -> list[tuple[float, int]]:
    """The ``k`` largest nonzero element errors as (value, flat index), largest first."""
    if not diff.numel() or k <= 0:
        return []
    top = torch.topk(diff.reshape(-1), min(k, diff.numel()))
    return [(v, i) for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True) if v != 0]


def _worst_of(got: torch.Tensor, want: torch.Tensor, top: list[tuple[float, int]]) -> list[Worst]:
    rows = []
    for value, i in top:
        index = list(torch.unravel_index(torch.tensor(i), want.shape)) if want.dim() else []
        rows.append(Worst([int(x) for x in index], _num(want.reshape(-1)[i]), _num(got.reshape(-1)[i]), value))
    return rows


def _num(x: torch.Tensor):
    v = x.item()
    return v if not isinstance(v, float) or math.isfinite(v) else repr(v)

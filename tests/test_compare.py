"""``compare``: the numbers behind every verdict, on tensors built to have known answers."""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch

from tapml.core import OpCall
from tapml.judging import HISTOGRAM_EDGES, Judge, Tolerance, compare

TOL = Tolerance(atol=1e-3, rtol=0.0, origin="test")


def test_identical_tensors_are_exact():
    x = torch.randn(4, 5)
    m = compare(x.clone(), x, TOL)
    assert m.ok and m.exact and m.max_abs == 0.0 and m.mismatches == 0 and m.worst == []


def test_errors_are_measured_and_located():
    want = torch.zeros(3, 4)
    got = want.clone()
    got[1, 2] = 0.5
    got[2, 3] = 2e-4  # inside atol
    m = compare(got, want, TOL)
    assert not m.ok and m.max_abs == 0.5 and m.mismatches == 1
    assert m.mismatch_fraction == 1 / 12
    assert m.worst[0].index == [1, 2] and m.worst[0].got == 0.5 and m.worst[0].expected == 0.0
    assert [w.index for w in m.worst] == [[1, 2], [2, 3]]  # only non-zero differences, largest first
    assert sum(m.histogram) == 12 and m.histogram[0] == 10  # ten exact elements


def test_the_tolerance_boundary_is_atol_plus_rtol_times_expected():
    want = torch.tensor([100.0, 1.0])
    tol = Tolerance(atol=0.0, rtol=0.01, origin="test")
    assert compare(torch.tensor([100.9, 1.0]), want, tol).ok
    assert not compare(torch.tensor([101.1, 1.0]), want, tol).ok


def test_shape_and_dtype_mismatches_are_problems_not_infinite_errors():
    m = compare(torch.zeros(2, 3), torch.zeros(3, 2), TOL, label="output 1 (mean)")
    assert not m.ok and m.problem == "output 1 (mean): shape [2, 3] ≠ expected [3, 2]" and m.max_abs is None
    assert m.problem_kind == "shape" and m.cosine is None
    m = compare(torch.zeros(3, dtype=torch.float64), torch.zeros(3), TOL)
    assert not m.ok and m.problem_kind == "dtype" and "dtype float64 ≠ expected float32" in m.problem


def test_nan_is_never_perfect():
    want = torch.ones(4)
    m = compare(torch.full((4,), float("nan")), want, TOL)
    assert not m.ok and m.nonfinite_mismatches == 4 and m.max_abs == math.inf
    assert math.isnan(m.cosine) and math.isnan(m.sqnr_db) and m.max_ulp is None
    both = torch.tensor([1.0, float("-inf"), float("nan")])
    assert compare(both.clone(), both, TOL).ok  # the same non-finite values on both sides match
    m = compare(torch.tensor([1.0, float("inf"), float("nan")]), both, TOL)
    assert not m.ok and m.nonfinite_mismatches == 1


def test_integers_must_match_exactly():
    m = compare(torch.tensor([1, 2, 4]), torch.tensor([1, 2, 3]), TOL)
    assert not m.ok and m.max_abs == 1 and not m.exact
    assert compare(torch.tensor([True, False]), torch.tensor([True, False]), TOL).ok


def test_cosine_sqnr_and_ulp():
    want = torch.tensor([1.0, 2.0, 3.0])
    got = torch.nextafter(want, torch.tensor(10.0))  # one ULP up everywhere
    m = compare(got, want, Tolerance(atol=0.0, rtol=0.0, origin="exact"))
    assert not m.ok and m.max_ulp == 1 and m.cosine > 0.999999 and m.sqnr_db > 100


SPEC = {"dtype": "float32", "shape": [4, 3], "stride": [3, 1]}
STAT = {"dtype": "float32", "shape": [4, 1], "stride": [1, 1]}
LAYER_NORM = OpCall(op="aten.native_layer_norm.default", args=[{"tensor": SPEC}, [3], None, None, 1e-5],
                    kwargs={"dict": {}}, outputs={"tuple": [{"tensor": SPEC}, {"tensor": STAT}, {"tensor": STAT}]})


def test_the_judge_names_the_wrong_output_and_only_live_outputs_decide():
    x = torch.randn(4, 3)
    want = list(torch.ops.aten.native_layer_norm.default(x, [3], None, None, 1e-5))
    wrong = [want[0], want[0], want[0]]  # TVM 0.27's bug: the normalized tensor for all three outputs
    m = Judge().judge(LAYER_NORM, wrong, want, [x])
    assert not m.ok and m.problem == "output 1 (mean): shape [4, 3] ≠ expected [4, 1]" and m.why == m.problem
    m = Judge().judge(LAYER_NORM, wrong, want, [x], live=[True, False, False])
    assert m.ok and [(d.output, d.name) for d in m.dead] == [(1, "mean"), (2, "rstd")]
    assert "shape [4, 3] ≠ expected [4, 1]" in m.dead[0].problem


def test_count_mismatch():
    m = Judge().judge(LAYER_NORM, [torch.zeros(4, 3)], [torch.zeros(4, 3)] * 3)
    assert not m.ok and m.problem_kind == "count" and "1 outputs ≠ expected 3" in m.problem


def test_histogram_edges_are_decades():
    assert HISTOGRAM_EDGES[0] == 1e-10 and HISTOGRAM_EDGES[-1] == 1e4 and len(HISTOGRAM_EDGES) == 15


def test_float64_results_of_a_gather_and_magnitudes_match_the_widened_computation():
    """Memory shortcuts of the bound rule leave its numbers unchanged: an embedding widens the rows it takes
    (not the table), and |x| in float64 neither copies twice nor writes a float64 input."""
    from tapml.judging import fp64_outputs
    from tapml.judging.bounds import _widened_abs

    table, idx = torch.randn(50, 8, dtype=torch.bfloat16), torch.randint(0, 50, (2, 3))
    weights = {"tensor": {"dtype": "bfloat16", "shape": [50, 8], "stride": [8, 1]}}
    rows = {"tensor": {"dtype": "int64", "shape": [2, 3], "stride": [3, 1]}}
    out = {"tensor": {"dtype": "bfloat16", "shape": [2, 3, 8], "stride": [24, 8, 1]}}
    emb = OpCall(op="aten.embedding.default", args=[weights, rows], kwargs={"dict": {}}, outputs=out)
    widened = torch.ops.aten.embedding.default(table.double(), idx)
    assert torch.equal(fp64_outputs(emb, [table, idx])[0], widened)
    rounded = torch.ops.aten.embedding.default(table.to(torch.float16).double(), idx)
    assert torch.equal(fp64_outputs(emb, [table, idx], torch.float16)[0], rounded)
    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # (negatives among them)
    assert torch.equal(_widened_abs(x), x.abs()) and (x < 0).any()  # the input itself left as it was
    assert torch.equal(_widened_abs(x.float()), x.float().double().abs())


def _cases():
    """Pairs the cheap tier decides and pairs it must hand to the torch path: every dtype it reads,
    NaN/Inf on either side, in and out of tolerance, empty, 0-d, broadcast and transposed views."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        w = torch.randn(6, 7, generator=g).to(dtype)
        up = torch.nextafter(w, torch.full_like(w, math.inf))
        yield w.clone(), w  # exact
        yield torch.where(torch.arange(42).reshape(6, 7) % 3 == 0, up, w), w  # one ULP: within float32's
        yield w + 1e-2, w  # out of tolerance
        yield (w.double() + 1.5e-5).to(dtype), w  # just past atol + rtol·|w| (float32)
        yield (w * (1 + 2e-7)).to(dtype), w
        nan = w.clone()
        nan[1, 2] = math.nan
        yield nan, w  # a NaN on the target's side only
        yield nan.clone(), nan  # on both
        inf = w.clone()
        inf[0, 0] = math.inf
        yield inf, w
        yield inf.clone(), inf
        yield w.clone(), inf
        yield w[:0].clone(), w[:0]
        yield torch.tensor(1.5, dtype=dtype), torch.tensor(1.5 + 2**-10, dtype=dtype)
        yield w.t().clone(), w.t()  # a transposed (non-contiguous) view
        yield torch.ones(1, 7, dtype=dtype).expand(6, 7).clone(), torch.ones(1, 7, dtype=dtype).expand(6, 7)
    ties = _rounded_ties()
    yield ties, torch.zeros_like(ties)  # exact differences
    yield ties, torch.tensor([2.0**-46, -(2.0**-50), 2.0**-50, 2.0**-80])  # float32 differences tie, not float64 ones
    yield ties * 2**16, torch.tensor([0.0, 0.0, 2.0**-34, 0.0])  # past atol: the bound decides (rtol > 0)
    yield torch.tensor([3e38, 1.0]), torch.tensor([-3e38, 1.0])  # a float32 difference that overflows
    yield torch.tensor([2.0**-140, 1.0]), torch.tensor([0.0, 1.0])  # one too small to trust in float32
    big = torch.tensor([1e308, -1e308], dtype=torch.float64)
    yield -big, big  # differences that overflow float64
    yield torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])
    yield torch.tensor([True, False]), torch.tensor([True, False])
    yield torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 2.0])  # a dtype problem


def _rounded_ties() -> torch.Tensor:
    return torch.tensor([2.0**-20 + 2.0**-43, 2.0**-20, 2.0**-20 + 2.0**-43, 2.0**-21])


def test_the_float32_pass_finds_the_float64_maximum_among_rounded_ties():
    """A float32 difference rounds: elements 0 and 2 tie there, element 2 is the larger in float64, and
    element 1 is past 2⁻²⁰ only in float64."""
    compare_module = importlib.import_module("tapml.judging.compare")
    got, want = _rounded_ties(), torch.tensor([2.0**-46, -(2.0**-50), 2.0**-50, 2.0**-80])
    exact = float((got.double() - want.double()).abs().max())
    assert exact == 2.0**-20 + 2.0**-43 - 2.0**-50 and float((got - want).abs().max()) != exact
    tol = Tolerance(atol=1e-5, rtol=0.0, origin="test")
    assert compare_module._top_within_float32(got.numpy(), want.numpy(), tol) == exact
    m = compare(got, want, tol, full=False)
    assert m.ok and m.max_abs == exact == compare(got, want, tol, full=True).max_abs
    past = Tolerance(atol=2.0**-20, rtol=0.0, origin="test")  # 3 past it, 1 of them at it in float32
    assert compare_module._top_within_float32(got.numpy(), want.numpy(), past) is None
    assert compare(got, want, past, full=False).mismatches == 3
    assert compare_module._top_within_float32(got[1:2].numpy(), want[1:2].numpy(), past) is None
    with warnings.catch_warnings():  # a float32 difference that overflows: the float64 pass decides, silently
        warnings.simplefilter("error")
        huge = compare(torch.tensor([3e38, 1.0]), torch.tensor([-3e38, 1.0]), tol, full=False)
    assert not huge.ok and huge.max_abs == float(torch.tensor(3e38).double() * 2)


@pytest.mark.parametrize("rtol", [0.0, 1.3e-6])
@pytest.mark.parametrize("full", [False, True])
def test_the_numpy_tier_reports_exactly_what_the_torch_path_reports(monkeypatch, full, rtol):
    compare_module = importlib.import_module("tapml.judging.compare")
    tol = Tolerance(atol=1e-5, rtol=rtol, origin="test")
    fast = [compare(g, w, tol, full=full) for g, w in _cases()]
    monkeypatch.setattr(compare_module, "arrays", lambda got, want: None)  # the torch path alone
    slow = [compare(g, w, tol, full=full) for g, w in _cases()]
    assert len(fast) > 50 and sum(m.ok for m in fast) > 10 and sum(not m.ok for m in fast) > 10
    assert [repr(m) for m in fast] == [repr(m) for m in slow]


@pytest.mark.parametrize("full", [False, True])
def test_a_tensor_judged_against_itself_reports_what_a_copy_of_it_reports(full):
    """An output that stands for its carved self (``engine.carved_for``) is compared with itself: the same
    metrics as against an equal copy: exact unless it holds a NaN (never bit-exact, as in any comparison)."""
    tol = Tolerance(atol=1e-5, rtol=1.3e-6, origin="test")
    wants = [w for _, w in _cases()]
    itself = [compare(w, w, tol, full=full) for w in wants]
    copies = [compare(w.clone(), w, tol, full=full) for w in wants]
    assert [repr(m) for m in itself] == [repr(m) for m in copies]
    assert any(m.exact for m in itself) and any(m.nan[1] and not m.exact for m in itself)


def test_a_use_is_held_by_a_tensor_with_its_key_dtype_shape_and_plain_layout():
    from tapml.carving import TensorRef
    from tapml.core import content_key

    t = torch.randn(3, 4)
    key = content_key(t.reshape(-1))
    ref = TensorRef(key, "float32", (3, 4), (4, 1), 0, True)
    assert ref.held_by(t, key)
    assert not ref.held_by(t, None) and not ref.held_by(t, "0" * 32)  # the target does not know it / another
    assert not ref.held_by(t.reshape(4, 3), key)  # the same bytes, another shape
    assert not ref.held_by(t.view(torch.int32), content_key(t.view(torch.int32).reshape(-1)))
    # the carved use's bytes in storage order are not its logical order: a transposed use is never held
    transposed = TensorRef(key, "float32", (4, 3), (1, 4), 0, True)
    assert not transposed.held_by(t.t().contiguous(), key) and not transposed.held_by(t.reshape(4, 3), key)
    assert not TensorRef(key, "float32", (3, 4), (4, 1), 0, True, storage=True).held_by(t, key)
    assert not TensorRef(key, "float32", (3, 4), (4, 1), 2, True).held_by(t, key)  # at an offset
    assert not TensorRef(key, "float32", (3, 4), (4, 1), 0, False).held_by(t, key)  # rebuilt from overlap
    assert not ref.held_by(torch.randn(4, 3).t(), key)  # a non-contiguous tensor
    assert TensorRef(key, "float32", (3, 1, 4), (4, 99, 1), 0, True).held_by(t.reshape(3, 1, 4), key)


def test_a_content_mark_names_one_tensor_object_until_it_is_written():
    import gc

    from tapml.core import content_mark, keys, mark_content

    t = torch.ones(3)
    assert mark_content(t, "k") is t and content_mark(t) == "k"
    assert content_mark(t.view(3)) is None and content_mark(t.clone()) is None  # other objects: no mark
    t.add_(1)  # an in-place write voids it
    assert content_mark(t) is None
    u = mark_content(torch.zeros(2), "u")
    ident = id(u)
    assert ident in keys._MARKS
    del u
    gc.collect()
    assert ident not in keys._MARKS  # forgotten with the tensor
    with torch.inference_mode():
        i = torch.ones(2)
    assert content_mark(mark_content(i, "i")) is None  # no version counter to guard it: not marked


def test_nonfinite_counts_are_cached_per_content_mark_and_bounded(monkeypatch):
    from tapml.judging import carved

    carved.clear()
    finite, nan = torch.ones(4), torch.tensor([1.0, math.nan, math.inf, math.inf])
    assert carved.nonfinite_counts(nan) == (1, 2) and carved.nonfinite_counts(finite) == (0, 0)
    assert carved.nonfinite_counts(nan, None, "a") == (1, 2)
    # a mark names one content for good: the second read of mark "a" is not recounted
    assert carved.nonfinite_counts(finite, None, "a") == (1, 2)
    assert carved.nonfinite_counts(torch.tensor([1, 2]), None, "ints") == (0, 0)  # integers: none, not cached
    assert "ints" not in carved._COUNTS
    monkeypatch.setattr(carved, "LIMIT", 2)
    carved.nonfinite_counts(finite, finite.numpy(), "b")
    carved.nonfinite_counts(finite, finite.numpy(), "c")  # past the limit: the oldest ("a") goes
    assert list(carved._COUNTS) == ["b", "c"]
    carved.clear()


def test_judging_a_carved_output_reads_its_counts_from_the_cache(tmp_path):
    """The mixed run's call: the carved output's NaN/Inf counts are computed on the first read of its
    content, then read from the cache; the verdict and the numbers do not change."""
    from tapml.carving import FixtureStore, carve
    from tapml.judging import carved

    model = torch.nn.Linear(8, 8).eval()
    x = torch.randn(2, 8)
    carve(model, lambda: model(x), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    index = next(op["index"] for op in store.ops if op["op"] == "aten.addmm.default")
    op, want = store.op_call(index), store.outputs(index, read_only=True)
    carved.clear()
    first = Judge().judge(op, [w.clone() for w in want], want, oracle=False)
    assert first.ok and first.exact and list(carved._COUNTS) == [store._output_refs[index][0]]
    carved._COUNTS[store._output_refs[index][0]] = (0, 3)  # what a cached read would say, made visible
    second = Judge().judge(op, [w.clone() for w in want], store.outputs(index, read_only=True), oracle=False)
    assert second.inf == [3, 3]
    carved.clear()
    assert Judge().judge(op, [w.clone() for w in want], want, oracle=False) == first


def _call(name: str, tensors: list, *rest, out_shape=None) -> tuple[OpCall, list]:
    """An OpCall of ``name`` on ``tensors`` (then ``rest``, plain values), as a store would record it."""
    from tapml.core.values import encode

    def spec(t: torch.Tensor) -> dict:
        return {"dtype": str(t.dtype)[6:], "shape": list(t.shape), "stride": list(t.stride())}

    args = encode([*tensors, *rest], lambda t: spec(t) if t is not None else None)
    out = getattr(torch.ops.aten, name.split(".")[1]).default(*tensors, *rest)
    return OpCall(op=name, args=args, kwargs={"dict": {}}, outputs={"tensor": spec(out)}), tensors


def test_a_big_weight_is_widened_a_column_block_at_a_time(monkeypatch):
    """The float64 exact result and |A|·|B| of a contraction whose widened weight exceeds the block size are
    computed in column blocks: the same shapes, values equal to the whole call's to float64 rounding, the same
    on every run; below the block size the result is bit-for-bit the whole call's."""
    import tapml.judging.blocked as blocked
    import tapml.judging.bounds as bounds
    import tapml.judging.judge as judge
    from tapml.judging import fp64_outputs

    g = torch.Generator().manual_seed(0)
    bf = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    w = bf(700, 64)  # a weight laid out as lm_head's: [N, K], used transposed
    cases = [_call("aten.mm.default", [bf(3, 64), w.t()]), _call("aten.addmm.default", [bf(700), bf(3, 64), w.t()]),
             _call("aten.addmm.default", [bf(3, 700), bf(3, 64), w.t()]),
             _call("aten.bmm.default", [bf(1, 3, 64), bf(1, 64, 700)]),
             _call("aten.baddbmm.default", [bf(1, 3, 700), bf(1, 3, 64), bf(1, 64, 700)]),
             _call("aten.linear.default", [bf(2, 3, 64), w, bf(700)]), _call("aten.linear.default", [bf(3, 64), w]),
             _call("aten.matmul.default", [bf(2, 3, 64), w.t()]), _call("aten.matmul.default", [bf(64), w.t()])]
    whole = [(fp64_outputs(op, x)[0], bounds._magnitude(op, x)[0]) for op, x in cases]
    for (op, x), (exact, mag) in zip(cases, whole, strict=True):  # unsplit: exactly one widened call
        assert torch.equal(exact, op.func(*[t.double() for t in x])), op.op
        assert torch.equal(mag, op.func(*[t.double().abs() for t in x])), op.op
    calls = []
    for module, name in ((judge, "_widen"), (bounds, "_widened_abs")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda v, *a, real=real: (calls.append(1) if isinstance(v, list) else None,
                                                                    real(v, *a))[1])
    monkeypatch.setattr(blocked, "BLOCK_BYTES", 64 * 8 * 100)  # 100 columns of 64 float64 values: 7 blocks
    for (op, x), (exact, mag) in zip(cases, whole, strict=True):
        calls.clear()
        e, m = fp64_outputs(op, x)[0], bounds._magnitude(op, x)[0]
        assert len(calls) == 14, op.op  # 7 blocks, each widened on its own, for each of the two
        assert e.dtype == m.dtype == torch.float64 and e.shape == exact.shape and m.shape == mag.shape
        torch.testing.assert_close(e, exact, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(m, mag, rtol=1e-13, atol=1e-13)
        assert torch.equal(e, fp64_outputs(op, x)[0]) and torch.equal(m, bounds._magnitude(op, x)[0])


@pytest.mark.parametrize("full", [False, True])
def test_chunked_float64_judging_reports_what_one_pass_reports(monkeypatch, full):
    """A large tensor is judged a chunk at a time: the same counts, maxima, worst elements and histogram,
    and the same sums to the last bits (cosine, SQNR) as one pass over it."""
    compare_module = importlib.import_module("tapml.judging.compare")
    tol = Tolerance(atol=1e-5, rtol=1.3e-6, origin="test")
    monkeypatch.setattr(compare_module, "arrays", lambda got, want: None)  # the torch path, which chunks
    whole = [compare(g, w, tol, full=full) for g, w in _cases()]
    monkeypatch.setattr(compare_module, "CHUNK", 5)  # 6×7 tensors in 9 chunks, a chunk edge mid-row
    chunked = [compare(g, w, tol, full=full) for g, w in _cases()]
    close = ("cosine", "sqnr_db")
    for a, b in zip(whole, chunked, strict=True):
        for field in vars(a):
            x, y = getattr(a, field), getattr(b, field)
            if field in close and isinstance(x, float) and math.isfinite(x):
                assert y == pytest.approx(x, rel=1e-12), field
            elif field == "worst":  # among equal errors, which elements are named is topk's choice either way
                assert sorted(w.diff for w in x) == sorted(w.diff for w in y)
            else:
                assert x == y or (x != x and y != y), (field, x, y)  # NaN equals NaN here
    assert sum(not m.ok for m in chunked) > 10


def test_chunked_rmse_and_bound_ratio_match_one_pass(monkeypatch):
    compare_module = importlib.import_module("tapml.judging.compare")
    judge_module = importlib.import_module("tapml.judging.judge")
    pairs = [(g, w) for g, w in _cases() if g.is_floating_point() and g.shape == w.shape and g.dtype == w.dtype
             and g.numel()]

    def figures():
        out = []
        for g, w in pairs:
            e = w.double() + 1e-9
            full = w.double().abs() * 1e-6 + 1e-7
            row = w.double().abs().amax(0, keepdim=True) * 1e-6 + 1e-7 if w.dim() == 2 else full  # broadcast
            ratio = judge_module._ratio
            out.append((compare_module.rmse(g, w), ratio(g, w, e, full), ratio(g, w, e, row)))
        return out

    whole = figures()
    for module in (compare_module, judge_module):
        monkeypatch.setattr(module, "CHUNK", 5)
    chunked = figures()
    assert len(pairs) > 30 and any(math.isinf(r[0]) for r in whole) and any(0 < r[1] < math.inf for r in whole)
    for a, b in zip(whole, chunked, strict=True):
        assert b[0] == pytest.approx(a[0], rel=1e-12) or a[0] == b[0]
        assert [x if x == x else "nan" for x in a[1:]] == [x if x == x else "nan" for x in b[1:]]  # maxima: exact


@pytest.mark.parametrize("rtol", [0.0, 1.3e-6])
def test_the_numpy_tier_chunked_decides_and_reports_as_one_pass(monkeypatch, rtol):
    compare_module = importlib.import_module("tapml.judging.compare")
    tol = Tolerance(atol=1e-5, rtol=rtol, origin="test")
    whole = [compare(g, w, tol) for g, w in _cases()]
    monkeypatch.setattr(compare_module, "CHUNK", 5)
    chunked = [compare(g, w, tol) for g, w in _cases()]
    assert sum(m.ok for m in whole) > 10
    fields = ("ok", "max_abs", "mismatches", "mismatch_fraction", "nan", "inf", "nonfinite_mismatches", "exact")
    for a, b in zip(whole, chunked, strict=True):  # what the cheap tier fills (the rest: the test above)
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]

"""``compare``: the numbers behind every verdict, on tensors built to have known answers."""

from __future__ import annotations

import math

import torch

from tapml.judging import HISTOGRAM_EDGES, Tolerance, compare, compare_outputs

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


def test_shape_and_dtype_mismatches_are_problems():
    m = compare(torch.zeros(2, 3), torch.zeros(3, 2), TOL)
    assert not m.ok and "shape [2, 3] instead of [3, 2]" in m.problem and math.isinf(m.max_abs)
    m = compare(torch.zeros(3, dtype=torch.float64), torch.zeros(3), TOL)
    assert not m.ok and "dtype float64 instead of float32" in m.problem


def test_integers_must_match_exactly():
    m = compare(torch.tensor([1, 2, 4]), torch.tensor([1, 2, 3]), TOL)
    assert not m.ok and m.max_abs == 1 and not m.exact
    assert compare(torch.tensor([True, False]), torch.tensor([True, False]), TOL).ok


def test_cosine_sqnr_and_ulp():
    want = torch.tensor([1.0, 2.0, 3.0])
    got = torch.nextafter(want, torch.tensor(10.0))  # one ULP up everywhere
    m = compare(got, want, Tolerance(atol=0.0, rtol=0.0, origin="exact"))
    assert not m.ok and m.max_ulp == 1 and m.cosine > 0.999999 and m.sqnr_db > 100


def test_compare_outputs_reports_the_worst_output_and_all_must_pass():
    a, b = torch.zeros(3), torch.ones(3)
    m = compare_outputs([a, b + 0.5], [a, b], TOL)
    assert not m.ok and m.output == 1 and m.outputs == 2 and m.max_abs == 0.5
    m = compare_outputs([a], [a, b], TOL)
    assert not m.ok and "1 outputs instead of 2" in m.problem


def test_histogram_edges_are_decades():
    assert HISTOGRAM_EDGES[0] == 1e-10 and HISTOGRAM_EDGES[-1] == 1e4 and len(HISTOGRAM_EDGES) == 15

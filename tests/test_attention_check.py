"""The SDPA-backend check of scripts/gpu-check, on the CPU: the math (and CPU flash) backend in float32/float64."""

from __future__ import annotations

import json

import pytest
import torch

import tapml
from tapml import attention_check as ac
from tapml.workloads import load_workload


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdpa")
    return [str(tapml.carve(spec, out=root / name).path) for name, spec in
            (("llama", "tapml.zoo.tiny_llama:build_sdpa"), ("ape", "tapml.zoo.seeds:build_ape_sdpa"))]


def test_every_carved_attention_call_is_found_with_its_mask(stores):
    llama, ape = (ac.attention_calls(tapml.open_store(s)) for s in stores)
    assert len(llama) == 2 and len(ape) == 4  # a call per layer; APE's layers attend twice (context, query)
    assert all(c.mask is not None and c.mask.shape[-1] == c.k.shape[-2] for c in llama + ape)


def test_the_sdpa_variants_compute_what_the_eager_workloads_do():
    eager, fused = load_workload("zoo:ape-attention"), load_workload("tapml.zoo.seeds:build_ape_sdpa")
    with torch.no_grad():
        torch.testing.assert_close(fused.run(), eager.run(), atol=1e-5, rtol=1e-5)


def test_the_math_backend_is_within_its_bound_in_float32_and_float64(stores):
    rows = ac.summarize(ac.check_stores(stores, device="cpu", backends=("math",), dtypes=("float32", "float64")))
    assert [(r["backend"], r["dtype"], r["verdict"]) for r in rows] == [("math", "float32", "pass"),
                                                                        ("math", "float64", "pass")]
    f32, f64 = rows
    assert 0 < f32["max_bound_ratio"] <= 1 and f32["max_abs_vs_float64"] < 1e-5
    assert f64["max_abs_vs_float64"] < 1e-12 and f32["calls"] == 6


def test_a_kernel_beyond_its_bound_is_named_with_its_worst_element(stores, monkeypatch):
    sdpa = ac._sdpa

    def off(call, dtype, device):  # a kernel 1e-3 off in float32; the float64 truth untouched
        out = sdpa(call, dtype, device)
        return out + 1e-3 if dtype == torch.float32 else out

    monkeypatch.setattr(ac, "_sdpa", off)
    (row,) = ac.summarize(ac.check_stores(stores[:1], device="cpu", backends=("math",), dtypes=("float32",)))
    assert row["verdict"] == "fail" and row["max_bound_ratio"] > 1
    assert row["first_failure"].startswith("llama op ") and "the bound at {'index'" in row["first_failure"]


def test_an_unavailable_backend_is_unsupported_with_torchs_reason(stores):
    (row,) = ac.summarize(ac.check_stores(stores[:1], device="cpu", backends=("efficient",), dtypes=("float32",)))
    assert row["verdict"] == "unsupported" and row["unsupported"] == row["calls"] == 2 and row["reason"]


def test_the_command_writes_the_table_and_the_json(stores, tmp_path, capsys):
    assert ac.main([*stores, "--device", "cpu", "--backends", "math", "--dtypes", "float32", "-o",
                    str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("| backend | dtype |")
    record = json.loads((tmp_path / "attention.json").read_text())
    assert record["rows"][0]["verdict"] == "pass" and len(record["calls"]) == 6
    assert (tmp_path / "attention.md").read_text().count("\n") == 3
    assert ac.main([*stores, "--backends", "warp"]) == 2

"""Platforms in process: registry, identity target, emulation, TVM, the README's fault injection."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from helpers import ran, run_ops
from tapml.cli import main
from tapml.core import OpCall
from tapml.platforms import BUILTINS, PlatformError, list_platforms, open_local, platform_class

ROOT = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers" / "failing_platforms.py"


def by_status(results, status):
    return [r for r in results if r.status == status]


def test_registry_lists_builtins_with_availability():
    rows = {r["name"]: r for r in list_platforms()}
    assert set(BUILTINS) <= set(rows)
    for name in ("torch-cpu", "fp16", "bf16", "tvm-llvm"):
        assert rows[name]["available"], rows[name]
    cuda = rows["torch-cuda"]
    assert cuda["available"] == torch.cuda.is_available()
    if not cuda["available"]:
        assert "CUDA" in cuda["reason"]


def test_registry_errors_and_file_classes():
    with pytest.raises(PlatformError, match="unknown platform 'nope'"):
        platform_class("nope")
    with pytest.raises(PlatformError, match="not a tapml.platforms.Platform subclass"):
        platform_class(f"{HELPERS}:NotAPlatform")
    assert platform_class(f"{HELPERS}:Hang").name == "hang"
    with pytest.raises(PlatformError, match="does not exist"):
        platform_class("missing_file.py:X")


def test_platforms_cli_json(capsys):
    assert main(["platforms", "--json", f"{ROOT}/examples/faulty_gelu.py:FaultyGelu"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tvm-llvm"]["available"] and "TVM" in rows["tvm-llvm"]["capabilities"]["device"]
    assert rows[f"{ROOT}/examples/faulty_gelu.py:FaultyGelu"]["available"]


def test_torch_cpu_local_error_is_exactly_zero(minilm_store):
    results = run_ops(minilm_store, "torch-cpu")
    done = ran(results)
    assert len(done) >= 150 and all(r.local.max_abs == 0.0 for r in done)
    assert {r.reason for r in by_status(results, "unsupported")} <= {
        "view op (no compute): stays on the reference",
        "returns a Python value, not tensors: stays on the reference",
    }


def test_fp16_error_is_nonzero_but_bounded(minilm_store):
    results = run_ops(minilm_store, "fp16")
    done = ran(results)
    errors = {r.index: r.local.max_abs for r in done}
    finite = [e for e in errors.values() if e != float("inf")]
    assert max(finite) > 0 and max(finite) < 1.0
    # BERT's attention mask holds float32's lowest value, which fp16 rounds to -inf
    overflow = [r for r in done if r.local.max_abs == float("inf")]
    assert overflow and {r.op for r in overflow} <= {"aten.scalar_tensor.default", "aten.where.self",
                                                          "aten.add.Tensor"}
    ints = [r for r in done if r.op in ("aten.embedding.default", "aten.arange.default")]
    assert ints
    for r in ints:
        if r.op == "aten.arange.default":
            assert r.local.max_abs == 0.0


def test_bf16_is_coarser_than_fp16(minilm_store):
    def median_error(name):
        errs = sorted(r.local.max_abs for r in ran(run_ops(minilm_store, name))
                      if r.local.max_abs not in (0.0, float("inf")))
        return errs[len(errs) // 2]

    assert median_error("bf16") > median_error("fp16")


def test_emulation_rules_keep_integer_ops_exact():
    op = OpCall(op="aten.add.Tensor", args=[{"tensor": {"dtype": "int64", "shape": [3], "stride": [1]}},
                                            {"tensor": {"dtype": "int64", "shape": [3], "stride": [1]}}],
                kwargs={"dict": {}}, outputs={"tensor": {"dtype": "int64", "shape": [3], "stride": [1]}})
    big = torch.tensor([70000, 2**40, -5])
    (out,) = open_local("fp16").execute(op, [big, big])
    assert out.dtype == torch.int64 and torch.equal(out, big * 2)


@pytest.mark.slow
def test_tvm_llvm_runs_or_refuses_every_op_and_caches(minilm_store, tmp_path, monkeypatch):
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path))  # a cold cache of its own
    tvm = open_local("tvm-llvm")
    results = run_ops(minilm_store, tvm)
    assert not by_status(results, "crashed"), by_status(results, "crashed")[:3]
    done = ran(results)
    assert len(done) >= 150
    assert all(r.reason for r in by_status(results, "unsupported"))
    addmm = [r for r in done if r.op == "aten.addmm.default"]
    assert addmm and max(r.local.max_abs for r in addmm) < 1e-3
    builds = tvm.stats["builds"]
    assert builds == len({minilm_store.ops[r.index]["signature"] for r in done})
    again = open_local("tvm-llvm")  # a new process would see the same disk cache
    run_ops(minilm_store, again)
    assert again.stats["builds"] == 0 and again.stats["disk_hits"] == builds


def test_readme_fault_injection_example_is_the_shipped_file():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    example = (ROOT / "examples" / "faulty_gelu.py").read_text()
    assert example in blocks
    assert len(example.strip().splitlines()) <= 25


def test_fault_injection_platform_via_file_class(minilm_store, capsys):
    spec = f"{ROOT}/examples/faulty_gelu.py:FaultyGelu"
    code = main(["replay", str(minilm_store.path), "--platform", spec, "--json"])
    assert code == 0  # replay, like offload's isolated pass, measures the first call of each signature
    capsys.readouterr()
    code = main(["replay", str(minilm_store.path), "--platform", spec, "--json", "--all-calls"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["platform"] == "faulty-gelu"  # a divergent op: the check failed
    wrong = [r for r in summary["ops"] if "local" in r and r["local"]["max_abs"] > 0]
    assert [(r["op"], r["module"]) for r in wrong] == [
        ("aten.gelu.default", "encoder.layer.3.intermediate.intermediate_act_fn")]


def test_tvm_accepts_unaligned_inputs(tmp_path, monkeypatch):
    """Regression (zoo:mamba): a contiguous view at an offset is not 64-byte aligned for DLPack."""
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path))
    spec = {"dtype": "float32", "shape": [3], "stride": [1]}
    op = OpCall(op="aten.add.Tensor", args=[{"tensor": spec}, {"tensor": spec}], kwargs={"dict": {}},
                outputs={"tensor": spec})
    base = torch.arange(8.0)
    x = base[1:4]  # 4 bytes past an aligned allocation
    assert x.data_ptr() % 64 != 0
    (out,) = open_local("tvm-llvm").execute(op, [x, x])
    assert torch.equal(out, x * 2)


def test_tvm_accepts_empty_inputs(tmp_path, monkeypatch):
    """Regression (zoo:phi3): partial rotary concatenates a zero-width tensor."""
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path))
    a = {"dtype": "float32", "shape": [1, 2, 3, 4], "stride": [24, 12, 4, 1]}
    b = {"dtype": "float32", "shape": [1, 2, 3, 0], "stride": [0, 0, 0, 1]}
    op = OpCall(op="aten.cat.default", args=[[{"tensor": a}, {"tensor": b}], -1], kwargs={"dict": {}},
                outputs={"tensor": a})
    x = torch.randn(1, 2, 3, 4)
    (out,) = open_local("tvm-llvm").execute(op, [x, torch.empty(1, 2, 3, 0)])
    assert torch.equal(out, x)

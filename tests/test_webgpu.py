"""tvm-webgpu: TVM's WGSL kernels on a real WebGPU implementation (wgpu; lavapipe on CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from tapml.carving import FixtureStore, carve
from tapml.cli import main
from tapml.core import OpCall
from tapml.engine import local_pass
from tapml.judging import Judge
from tapml.platforms import Unsupported, open_local, platform_class

AVAILABLE = platform_class("tvm-webgpu").availability()
if not AVAILABLE:
    if os.environ.get("CI"):
        pytest.fail(f"tvm-webgpu unavailable in CI: {AVAILABLE.reason}", pytrace=False)
    pytestmark = pytest.mark.skip(reason=f"tvm-webgpu unavailable here: {AVAILABLE.reason}")


@pytest.fixture(scope="module")
def webgpu(tmp_path_factory):
    os.environ.setdefault("TAPML_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return open_local("tvm-webgpu")


class Kernels(nn.Module):
    """One of each kernel family the issue names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, ids, x):
        h = self.embed(ids)  # embedding / gather (int64 indices, narrowed)
        y = x * 2.0 + 1.0  # elementwise
        y = y + torch.arange(16.0)  # broadcasting
        s = y.sum(dim=-1, keepdim=True) + y.mean(dim=-1, keepdim=True)  # reductions
        q = self.proj(h)  # addmm
        k = h @ self.proj.weight  # matmul
        att = torch.softmax((q @ k.transpose(-2, -1)) / 4.0, dim=-1)  # attention: bmm, softmax
        out = att @ h
        g = nn.functional.gelu(self.norm(out))  # layer norm, gelu
        cat = torch.cat([g, s.expand(-1, -1, 16)], dim=1)  # concat
        return cat[:, 1:5].clone() + ids.sum()  # slice (copied), integer reduction


@pytest.fixture(scope="module")
def kernel_store(tmp_path_factory):
    torch.manual_seed(0)
    model = Kernels().eval()
    ids, x = torch.randint(0, 50, (2, 6)), torch.randn(2, 6, 16)
    path = tmp_path_factory.mktemp("k") / "store"
    carve(model, lambda: model(ids, x), path)
    return FixtureStore(path)


def test_kernels_match_the_reference(kernel_store, webgpu):
    rows = local_pass(kernel_store, webgpu, Judge(), all_calls=True)
    ran = {r.op: r for r in rows.values() if r.local is not None}
    for op in ("aten.embedding.default", "aten.mul.Tensor", "aten.add.Tensor", "aten.sum.dim_IntList",
               "aten.mean.dim", "aten.addmm.default", "aten.bmm.default", "aten._softmax.default",
               "aten.gelu.default", "aten.cat.default", "aten.clone.default"):
        assert op in ran, (op, sorted(ran))
        assert ran[op].status == "ok", (op, ran[op].local)
    assert ran["aten.embedding.default"].local.max_abs == 0.0  # a gather is exact
    # layer norm: the normalized output is right; TVM 0.27's frontend returns wrongly shaped mean/rstd, which
    # nothing reads here: a dead-output finding, not a divergence
    norm = ran["aten.native_layer_norm.default"]
    assert norm.status == "ok" and [d.output for d in norm.local.dead] == [1, 2]
    assert "output 1 (mean): shape" in norm.local.dead[0].problem
    i = norm.index
    got = webgpu.execute(kernel_store.op_call(i), kernel_store.inputs(i))[0]
    assert torch.allclose(got, kernel_store.outputs(i)[0], atol=1e-5, rtol=1.3e-6)


def test_int64_is_narrowed_or_refused(webgpu):
    spec = {"dtype": "float32", "shape": [10, 4], "stride": [4, 1]}
    idx = {"dtype": "int64", "shape": [3], "stride": [1]}
    out = {"dtype": "float32", "shape": [3, 4], "stride": [4, 1]}
    op = OpCall(op="aten.embedding.default", args=[{"tensor": spec}, {"tensor": idx}], kwargs={"dict": {}},
                outputs={"tensor": out})
    w = torch.randn(10, 4)
    (got,) = webgpu.execute(op, [w, torch.tensor([1, 7, 2])])
    assert torch.equal(got, w[[1, 7, 2]])
    with pytest.raises(Unsupported, match="beyond the int32 range"):
        webgpu.execute(op, [w, torch.tensor([1, 2**40, 2])])
    ints = {"dtype": "int64", "shape": [3], "stride": [1]}
    arange = OpCall(op="aten.add.Tensor", args=[{"tensor": ints}, {"tensor": ints}], kwargs={"dict": {}},
                    outputs={"tensor": ints})
    assert "no 64-bit integers" in webgpu.prepare(arange).reason


def test_limits_come_from_the_adapter(webgpu, capsys):
    caps = webgpu.capabilities()
    limits = dict(caps.limits)
    assert limits["max-storage-buffer-binding-size"] == caps.max_buffer_bytes > 0
    assert {"max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup"} <= set(limits)
    assert main(["platforms", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "tvm-webgpu")
    assert row["available"] and row["capabilities"]["device"] == caps.device


def test_a_buffer_over_the_limit_is_unsupported_with_the_limit_named(webgpu):
    limit = webgpu.capabilities().max_buffer_bytes
    n = limit // 4 + 1
    spec = {"dtype": "float32", "shape": [n], "stride": [1]}
    op = OpCall(op="aten.neg.default", args=[{"tensor": spec}], kwargs={"dict": {}}, outputs={"tensor": spec})
    reason = webgpu.prepare(op).reason
    assert "max buffer size" in reason and str(limit) in reason


@pytest.mark.slow
def test_minilm_offloaded_to_webgpu(minilm_store, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["offload", "zoo:minilm", "--platform", "tvm-webgpu", "--store", str(minilm_store.path),
                 "-o", str(out), "--json"])
    brief = json.loads(capsys.readouterr().out)
    assert code == 0 and brief["verdict"] == "ok" and brief["coverage"] >= 0.8  # layer norms' bad outputs are dead
    record = json.loads((out / "run.json").read_text())
    assert record["counts"]["crashed"] == 0 and record["steps"][-1]["end_to_end"]["max_abs"] < 1e-3
    assert all(o["reason"] for o in record["ops"] if o["status"] == "unsupported")
    assert (out / "report.html").exists()


class Block(nn.Module):
    """A layer-like unit: projection, GELU, residual, layer norm (fused by Relax into a few kernels)."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(16, 32), nn.LayerNorm(16)
        self.back = nn.Linear(32, 16)

    def forward(self, x):
        return self.norm(x + self.back(nn.functional.gelu(self.proj(x))))


class Embedded(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.block = nn.Embedding(50, 16), Block()

    def forward(self, ids):
        return self.block(self.embed(ids))


def test_a_module_compiles_as_one_fused_webgpu_unit(tmp_path, monkeypatch):
    from tapml.engine.units import Units, carved_outputs, unit_inputs
    from tapml.platforms import LocalTarget, get_platform

    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = Embedded().eval()
    ids = torch.randint(0, 50, (2, 6))
    carve(model, lambda: model(ids), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    units = Units(store)
    by_module = {layer["module"]: units.get(layer["index"]) for layer in store.layers}
    target = LocalTarget(get_platform("tvm-webgpu"))
    # int64 token ids at the boundary: refused in one line, so top-down descends to the children
    assert target.prepare_unit(by_module[""][0]).reason.startswith("a int64 unit input: WGSL storage has no int64")
    unit, span = by_module["block"]
    assert target.prepare_unit(unit)
    inputs = unit_inputs(store, unit)
    (got,) = target.execute_unit(unit, inputs)
    (want,) = carved_outputs(store, span)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # the fused kernels, in launch order, each with what it wrote; the last one is the layer norm's output
    trace = target.trace_unit(unit, inputs)
    names = [name for name, _ in trace]
    assert any(n.startswith("fused_") for n in names) and len(names) < len(unit.nodes)
    assert torch.equal(trace[-1][1][0], got)
    # the launch plan is on disk by unit signature: a new platform builds nothing
    fresh = LocalTarget(get_platform("tvm-webgpu"))
    assert fresh.prepare_unit(unit) and fresh.stats["disk_hits"] == 1 and fresh.stats["builds"] == 0
    assert torch.equal(fresh.execute_unit(unit, inputs)[0], got)


@pytest.mark.slow
def test_minilm_top_down_on_webgpu_runs_the_encoder_layers_as_units(minilm_store):
    from tapml import api
    from tapml.settings import Settings

    run = api.offload("zoo:minilm", settings=Settings(platform="tvm-webgpu", in_process=True), plan="top-down",
                      store=minilm_store)
    units = {u.module: u for u in run.units}
    assert units["encoder.layer.0"].local.ok  # alone on its carved inputs: within the bound (vs float64)
    for i in range(6):
        layer = units[f"encoder.layer.{i}"]
        assert layer.status == "compiled" and layer.propagated.max_abs < 1e-4, (layer.module, layer.propagated)
        assert layer.local is None or layer.local.ok, (layer.module, layer.local)  # checked if off live
    assert "no int64" in units["embeddings"].reason  # token ids: the children run instead
    assert run.target_stats["unit_compiles"] >= 2  # one BertLayer signature serves six layers
    assert sum(u.status == "compiled" and u.module.startswith("encoder.layer.") for u in run.units) == 6

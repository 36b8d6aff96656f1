"""The tracer on tricky ops: every record must replay bit-exactly from the store."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tapml.carving import CarveOptions, FixtureStore, carve, replay, step


def carve_fn(tmp_path, model, fn, **options) -> FixtureStore:
    carve(model, fn, tmp_path / "store", options=CarveOptions(**options))
    return FixtureStore(tmp_path / "store")


def ops_named(store, name):
    return [op for op in store.ops if op["op"] == name]


class Twice(nn.Module):
    """One submodule called twice, an in-place op, views, multi-output and list ops."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, idx):
        a = self.lin(x)
        a.add_(1.5)  # in-place
        b = self.lin(a.t().contiguous().t())  # second call of the same module, on a view
        parts = torch.split(b, [3, 5], dim=1)  # multi-output
        c = torch.cat([parts[1], parts[0]], dim=1)  # list of tensors
        mx, arg = c.max(dim=1)  # tuple output with an int64 tensor
        mask = c > 0  # bool dtype
        return c.sum() + mx.sum(), arg + idx, mask


@pytest.fixture
def twice_store(tmp_path):
    torch.manual_seed(0)
    model = Twice().eval()
    x, idx = torch.randn(4, 8), torch.arange(4, dtype=torch.int32)
    return carve_fn(tmp_path, model, lambda: model(x, idx))


def test_records_overloads_modules_calls_and_source(twice_store):
    addmms = ops_named(twice_store, "aten.addmm.default")
    assert [(op["module"], op["call"]) for op in addmms] == [("lin", 0), ("lin", 1)]
    assert all(op["source"].endswith(".py:" + op["source"].rsplit(":", 1)[1]) for op in addmms)
    assert all("test_tracer.py" in op["source"] for op in addmms)  # the user's line, not torch's
    layers = [(layer["module"], layer["call"]) for layer in twice_store.layers]
    assert layers == [("", 0), ("lin", 0), ("lin", 1)]
    lin1 = twice_store.layers[2]
    assert lin1["parent"] == 0 and lin1["ops"][1] > lin1["ops"][0]
    assert lin1["inputs"][0]["path"] == "['args'][0]" and lin1["outputs"][0]["tensor"]["shape"] == [4, 8]


def test_inplace_records_input_before_and_output_after(twice_store):
    (add_,) = ops_named(twice_store, "aten.add_.Tensor") or ops_named(twice_store, "aten.add_.Scalar")
    assert add_["inplace"] and not add_["view"]
    before = twice_store.load(add_["args"][0]["tensor"])
    after = twice_store.load(add_["outputs"]["tensor"])
    assert torch.equal(before + 1.5, after)


def test_views_multi_output_lists_and_dtypes(twice_store):
    assert all(op["view"] for op in ops_named(twice_store, "aten.t.default"))
    split = ops_named(twice_store, "aten.split_with_sizes.default")[0]
    assert len(split["outputs"]) == 2 and split["view"]
    cat = ops_named(twice_store, "aten.cat.default")[0]
    assert isinstance(cat["args"][0], list) and len(cat["args"][0]) == 2
    mx = ops_named(twice_store, "aten.max.dim")[0]
    assert [o["tensor"]["dtype"] for o in mx["outputs"]["tuple"]] == ["float32", "int64"]
    gt = ops_named(twice_store, "aten.gt.Scalar")[0]
    assert gt["outputs"]["tensor"]["dtype"] == "bool"


def test_replay_is_bit_exact(twice_store):
    report = replay(twice_store)
    assert report.ok, report.mismatches
    assert report.checked == len(twice_store.ops)


def test_transposed_weight_is_stored_once(twice_store):
    weight_refs = [op["args"][0]["tensor"] for op in ops_named(twice_store, "aten.t.default")]
    outs = [op["outputs"]["tensor"] for op in ops_named(twice_store, "aten.t.default")]
    assert weight_refs[0]["key"] == outs[0]["key"]  # t(W) shares W's bytes
    assert outs[0]["stride"] == [1, 8]  # but keeps its own layout


def test_bf16_and_non_tensor_args_roundtrip(tmp_path):
    x = torch.randn(3, 5).to(torch.bfloat16)

    def run():
        y = torch.nn.functional.pad(x, (1, 2), value=float("-inf"))
        z = y.to(torch.float32, memory_format=torch.contiguous_format)
        return z.clamp(min=-2).sum(dim=[0], keepdim=True, dtype=torch.float64), x.float().expand(2, 3, 5).sum()

    store = carve_fn(tmp_path, nn.Identity(), run)
    pad = next(op for op in store.ops if "pad" in op["op"] or "constant_pad" in op["op"])
    assert {"float": "-inf"} in pad["args"]
    assert store.load(pad["args"][0]["tensor"]).dtype == torch.bfloat16
    assert torch.equal(store.load(pad["args"][0]["tensor"]), x)  # lossless
    dtypes = [op["kwargs"].get("dict", {}).get("dtype") for op in store.ops]
    assert {"dtype": "float64"} in dtypes
    assert replay(store).ok


def test_expanded_tensor_stores_one_copy(tmp_path):
    x = torch.randn(1, 64)
    store = carve_fn(tmp_path, nn.Identity(), lambda: x.expand(1000, 64) * 2)
    mul = ops_named(store, "aten.mul.Tensor")[0]
    ref = mul["args"][0]["tensor"]
    assert ref["stride"][0] == 0 and store.tensors[ref["key"]]["numel"] == 64
    assert replay(store).ok


def test_random_ops_are_marked_nondeterministic(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    store = carve_fn(tmp_path, model, lambda: model(torch.randn(2, 4)))
    dropout = [op for op in store.ops if "dropout" in op["op"] or "bernoulli" in op["op"]]
    assert dropout and all(op["nondeterministic"] for op in dropout)
    report = replay(store)
    assert report.ok and report.skipped >= 1


def test_generate_loop_records_steps(llama_generate_store):
    steps = [s["name"] for s in llama_generate_store.steps]
    assert steps == ["prefill", "decode 1", "decode 2", "decode 3"]
    argmax = ops_named(llama_generate_store, "aten.argmax.default")
    assert [op["step"] for op in argmax] == [0, 1, 2, 3]
    # the KV cache grows: decode 3's attention sees 8 + 3 keys
    bmm = [op for op in llama_generate_store.ops if op["step"] == 3 and op["op"] == "aten.bmm.default"]
    assert any(11 in op["args"][1]["tensor"]["shape"] for op in bmm)
    decode_layers = {(la["module"], la["call"]) for la in llama_generate_store.layers if la["step"] == 3}
    assert ("layers.1.self_attn", 3) in decode_layers


def test_root_calls_without_named_steps_become_steps(tmp_path):
    model = nn.Linear(3, 3)
    store = carve_fn(tmp_path, model, lambda: [model(torch.ones(1, 3)) for _ in range(3)])
    names = [s["name"] for s in store.steps]
    assert names == ["outside the model", "call 0", "call 1", "call 2"]  # torch.ones runs before the call
    with step("outer"):
        pass  # a step outside a carve is harmless


def test_filters_modules_ops_unique_and_budget(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    only_second = carve_fn(tmp_path / "a", model, lambda: model(x), modules=r"^2$")
    assert {op["module"] for op in only_second.ops} == {"2"}
    only_addmm = carve_fn(tmp_path / "b", model, lambda: model(x), ops=("aten.addmm*",))
    assert [op["op"] for op in only_addmm.ops] == ["aten.addmm.default"] * 2
    unique = carve_fn(tmp_path / "c", model, lambda: [model(x) for _ in range(3)], unique=True)
    sigs = [op["signature"] for op in unique.ops]
    assert len(sigs) == len(set(sigs))
    budget = carve_fn(tmp_path / "d", model, lambda: model(x), max_bytes=300)
    assert budget.manifest["truncated"] and len(budget.ops) < len(only_addmm.ops) + 10
    rng = budget.tensors[budget.manifest["rng_state"]["key"]]["nbytes"]  # the generator state, kept beside the ops
    assert budget.stored_bytes - rng < 4096


def test_minilm_carve_is_large_and_replays_exactly(minilm_store):
    assert len(minilm_store.ops) >= 200
    assert any(op["module"] == "encoder.layer.3.attention.self.query" for op in minilm_store.ops)
    assert any("modeling_bert.py" in (op["source"] or "") for op in minilm_store.ops)
    report = replay(minilm_store)
    assert report.ok and report.fidelity == 1.0


def test_llama_generate_replays_exactly(llama_generate_store):
    report = replay(llama_generate_store)
    assert report.ok and report.checked == len(llama_generate_store.ops)


def test_out_variant_is_recorded_as_inplace(tmp_path):
    a, b, c = torch.ones(3), torch.full((3,), 2.0), torch.zeros(3)
    store = carve_fn(tmp_path, nn.Identity(), lambda: torch.add(a, b, out=c))
    (add,) = ops_named(store, "aten.add.out")
    assert add["inplace"] and "out" in add["kwargs"]["dict"]
    assert torch.equal(store.load(add["kwargs"]["dict"]["out"]["tensor"]), torch.zeros(3))  # before
    assert torch.equal(store.load(add["outputs"]["tensor"]), torch.full((3,), 3.0))  # after
    assert replay(store).ok


def test_strided_1d_views_are_stored_packed(tmp_path):
    """Regression (gpt_neox, bart): a 1-D view with gaps reshaped to itself, not to packed bytes."""
    base = torch.randn(4, 6)
    store = carve_fn(tmp_path, nn.Identity(), lambda: base[:, 2] * 2 + base.reshape(-1)[::3].sum())
    mul = ops_named(store, "aten.mul.Tensor")[0]
    assert mul["args"][0]["tensor"]["stride"] == [6]
    assert replay(store).ok

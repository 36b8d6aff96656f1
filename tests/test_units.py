"""Compiled modules as migration units (``--plan top-down``): building units from a store, running them
in the live mixed run, and localizing top-down — unit → child module → op → fused kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tapml import api
from tapml.carving import FixtureStore, carve
from tapml.engine.units import Units, carved_outputs, unit_inputs
from tapml.platforms import LocalTarget, get_platform, run_program
from tapml.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
HELPERS = ROOT / "tests" / "helpers" / "failing_platforms.py"


def _offload(platform: str, **kw):
    return api.offload("zoo:minilm", settings=Settings(platform=platform, in_process=True), plan="top-down", **kw)


def test_every_module_call_of_minilm_is_a_unit_that_replays_bit_exactly(minilm_store):
    units = Units(minilm_store)
    built = 0
    for layer in minilm_store.layers:
        made = units.get(layer["index"])
        if isinstance(made, str):
            continue
        unit, span = made
        got = run_program(unit, unit_inputs(minilm_store, unit))
        for g, w in zip(got, carved_outputs(minilm_store, span), strict=True):
            assert torch.equal(g, w), layer["module"]
        built += 1
    assert built == 99  # of 113 calls: the root (an .item() inside) and 13 dropouts (no ops) are not
    # the root call reads a mask value with .item(): not one program; dropout (eval) holds no ops
    assert "Python value" in units.get(0)
    assert units.refused[6] == "no ops inside"
    # the six encoder layers are one signature: one compile serves them all
    sigs = {units.get(layer["index"])[0].signature for layer in minilm_store.layers if layer["class"] == "BertLayer"}
    assert len(sigs) == 1


class Cache(torch.nn.Module):
    def forward(self, cache, x):
        cache.add_(x)  # writes the module's input in place
        return cache * 2


class Noisy(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.dropout(x, 0.5, training=True) + 1


class Both(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cache, self.noisy, self.a, self.b = Cache(), Noisy(), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        c = self.cache(torch.zeros(2, 4), x)
        return self.a(x) + self.b(x) + self.noisy(x) + c


def test_what_cannot_be_a_unit_says_why(tmp_path):
    model, x = Both(), torch.randn(2, 4)
    carve(model, lambda: model(x), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    units = Units(store)
    by_module = {layer["module"]: units.get(layer["index"]) for layer in store.layers}
    assert "writes the module's input in place" in by_module["cache"]
    assert "draws random numbers" in by_module["noisy"]
    assert not isinstance(by_module["a"], str) and not isinstance(by_module["b"], str)


def test_parallel_branches_migrate_as_siblings_in_one_step(tmp_path):
    model, x = Both(), torch.randn(2, 4)
    from tapml.engine.topdown import plan_top_down, top_down_steps

    carve(model, lambda: model(x), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    td = plan_top_down(store, LocalTarget(get_platform("torch-cpu")))
    steps = top_down_steps(store, td)
    # the root is refused (a random op and an in-place cache inside); a and b read only x: one level
    assert [s["groups"] for s in steps] == [["a", "b"]]
    assert {r.module: r.status for r in td.rows.values()}["cache"] == "not a unit"


def test_top_down_on_the_identity_target_runs_every_layer_as_a_unit():
    run = _offload("torch-cpu")
    assert run.verdict == "ok", run.summary
    compiled = [u for u in run.units if u.status == "compiled"]
    assert [u.module for u in compiled] == ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)] + ["pooler"]
    assert all(u.propagated.max_abs == 0 for u in compiled)
    assert run.plan.kind == "top-down" and len(run.plan.dag) == 8
    assert ["encoder.layer.0", "encoder.layer.1"] in run.plan.edges
    inside = [o for o in run.ops if o.reason and "inside the compiled unit" in o.reason]
    assert len(inside) > 150 and all(o.offloaded for o in inside)
    assert run.offloaded_ops == run.compute_ops


def test_a_graph_level_fault_is_localized_to_the_unit():
    run = _offload(f"{HELPERS}:FusionBug")
    assert run.verdict == "divergent"
    c = run.culprit
    assert (c.level, c.module, c.unit) == ("unit", "encoder.layer.2", "encoder.layer.2"), run.summary
    assert "graph-level" in run.summary and "graph-level" in c.descent[-1]
    assert c.descent[0].startswith("encoder.layer.2 (BertLayer)")


def test_an_op_fault_inside_a_unit_is_localized_down_to_the_op():
    run = _offload(f"{ROOT}/examples/faulty_gelu_units.py:FaultyGeluUnits")
    assert run.verdict == "divergent"
    c = run.culprit
    assert (c.level, c.op, c.module) == ("op", "aten.gelu.default", "encoder.layer.3.intermediate.intermediate_act_fn")
    # the descent went layer → its intermediate block → the activation module → the op
    assert c.unit == "encoder.layer.3.intermediate.intermediate_act_fn"
    assert [d.split(" ")[0] for d in c.descent] == ["encoder.layer.3", "encoder.layer.3.intermediate",
                                                    "encoder.layer.3.intermediate.intermediate_act_fn",
                                                    "aten.gelu.default"]


@pytest.mark.slow
def test_a_misfused_tvm_kernel_is_named():
    pytest.importorskip("tvm")
    run = _offload(f"{HELPERS}:MisfusedGelu")
    assert run.verdict == "divergent"
    c = run.culprit
    assert c.level == "kernel" and "gelu" in c.kernel and "aten.gelu.default" in c.covers, run.summary
    assert c.module == "encoder.layer.0.intermediate.intermediate_act_fn"
    assert "fused kernel" in run.summary


@pytest.mark.slow
def test_minilm_runs_top_down_as_compiled_tvm_units():
    pytest.importorskip("tvm")
    run = _offload("tvm-llvm")
    assert run.verdict == "ok", run.summary
    compiled = {u.module for u in run.units if u.status == "compiled"}
    assert {f"encoder.layer.{i}" for i in range(6)} <= compiled
    assert run.target_stats["unit_compiles"] == 3  # embeddings, one BertLayer signature, pooler
    # the loose mask ops compile lazily inside the live run's dispatch mode, in this process: they export too
    assert run.offloaded_ops == run.compute_ops, [o.reason for o in run.ops if o.status == "unsupported"][:3]


def test_units_run_through_a_spawned_worker_and_the_worker_checks_every_node(minilm_store, tmp_path):
    from tapml.remote import RemoteTarget

    units = Units(minilm_store)
    layer = next(x["index"] for x in minilm_store.layers if x["module"] == "encoder.layer.1")
    unit, span = units.get(layer)
    with RemoteTarget(spawn="torch-cpu") as target:
        assert target.prepare_unit(unit)
        got = target.execute_unit(unit, unit_inputs(minilm_store, unit))
        assert all(torch.equal(g, w) for g, w in zip(got, carved_outputs(minilm_store, span), strict=True))
        again = target.execute_unit(unit, unit_inputs(minilm_store, unit))  # weights by key: nothing resent
        assert all(torch.equal(a, g) for a, g in zip(again, got, strict=True))
        assert target.stats["unit_runs"] == 2 and target.stats["bytes_reused"] > 0
        # a unit holding a node the worker must not run is refused, with the node named
        model, x = Both(), torch.randn(2, 4)
        carve(model, lambda: model(x), tmp_path / "s")
        small = FixtureStore(tmp_path / "s")
        noisy = next(r["index"] for r in small.layers if r["module"] == "noisy")
        a, b = small.layers[noisy]["ops"]
        nodes = [dict(small.ops[i], args=[], kwargs={"dict": {}}) for i in range(a, b)]
        bad = type(unit).from_json({"module": "noisy", "cls": "Noisy", "call": 0, "inputs": [],
                                    "nodes": [{k: n[k] for k in ("op", "args", "kwargs", "outputs")}
                                              for n in nodes if "bernoulli" in n["op"] or "rand" in n["op"]][:1],
                                    "outputs": [[0, 0]]})
        support = target.prepare_unit(bad)
        assert not support and "node 0" in support.reason and "random" in support.reason


def test_ape_attentions_parallel_chunks_migrate_as_siblings():
    run = api.offload("zoo:ape-attention", settings=Settings(platform="torch-cpu", in_process=True),
                      plan="top-down")
    assert run.verdict == "ok", run.summary
    assert run.plan.dag[0] == ["embed", "pos", "embed (call 1)", "pos (call 1)"]  # both chunks in one step
    assert ["norms.0", "norms.0 (call 1)"] in run.plan.dag
    assert len(run.plan.dag) < len([u for u in run.units if u.status == "compiled"])


def test_a_unit_that_fails_on_the_target_makes_the_run_incomplete_never_ok():
    run = _offload(f"{HELPERS}:UnitRaises")
    assert run.verdict == "incomplete", run.summary
    row = next(u for u in run.units if u.module == "encoder.layer.1")
    assert row.status == "failed" and "illegal memory access" in row.reason
    assert "encoder.layer.1" in run.reason
    # its ops stayed on the reference: not counted as offloaded
    assert run.offloaded_ops < run.compute_ops


def test_a_graph_level_fault_is_found_through_a_spawned_worker_too():
    """The worker runs each call of a repeated block as that call (its module path), not as the first
    call it prepared: a fault keyed on the module path fires where it should."""
    run = api.offload("zoo:minilm", settings=Settings(platform=f"{HELPERS}:FusionBug"), plan="top-down")
    assert run.verdict == "divergent", run.summary
    assert (run.culprit.level, run.culprit.module) == ("unit", "encoder.layer.2")


class KVCat(torch.nn.Module):
    """A KV cache's first step: torch.cat of the legacy empty ``(0,)`` start with 4-D keys."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, k):
        past = torch.tensor([], dtype=k.dtype)
        return torch.cat([past, self.proj(k)], dim=-2) * 2


def test_a_cat_with_the_legacy_empty_tensor_compiles_as_a_tvm_unit(tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    from tapml.engine.units import carved_outputs

    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path / "cache"))
    model, k = KVCat(), torch.randn(1, 2, 3, 4)
    carve(model, lambda: model(k), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    unit, span = Units(store).get(0)
    assert any(s.shape == (0,) for c in unit.calls if c.op == "aten.cat.default" for s in c.inputs)
    target = LocalTarget(get_platform("tvm-llvm"))
    assert target.prepare_unit(unit), "TVM's concat rejects mixed ranks: the empty start must be dropped"
    (got,) = target.execute_unit(unit, unit_inputs(store, unit))
    assert torch.allclose(got, carved_outputs(store, span)[0], atol=1e-6)


def test_a_unit_that_is_one_op_is_judged_by_that_ops_bound_not_called_graph_level():
    """tanh a few ULPs off inside a compiled unit (a different libm): the unit rule may flag it, but a unit
    that computes one op within that op's own bound is no graph-level defect — no culprit."""
    run = _offload(f"{HELPERS}:TanhUlps")
    rows = {u.module: u for u in run.units}
    assert not rows["pooler"].local.ok and not rows["pooler.activation"].local.ok  # the unit rule's alarm
    assert run.culprit is None and run.verdict == "ok", run.summary


class _Picky(LocalTarget):
    """torch-cpu that refuses one unit, returns wrong shapes for another, and doubles a third's outputs."""

    def execute_unit(self, unit, inputs):
        if unit.module == "encoder.layer.1":
            from tapml.platforms import Unsupported
            raise Unsupported("not this one")
        outs = super().execute_unit(unit, inputs)
        if unit.module == "encoder.layer.3":
            return [o[..., :1] for o in outs]
        if unit.module == "encoder.layer.5":
            return [o * 2 for o in outs]
        return outs


def test_inside_a_unit_the_reference_stands_by_and_takes_over_exactly_where_the_target_cannot(minilm_store):
    """Ops inside a unit return stand-ins (the reference does not compute them); a unit the target refuses
    or answers with wrong shapes runs again on the reference, so what flows on is exactly the reference's;
    a unit the target answers flows on with the target's values."""
    from tapml.engine import run_step
    from tapml.engine.topdown import plan_top_down, top_down_steps
    from tapml.judging import Judge
    from tapml.workloads import load_workload

    workload = load_workload("zoo:minilm")
    target = _Picky(get_platform("torch-cpu"))
    last = top_down_steps(minilm_store, plan_top_down(minilm_store, target))[-1]
    layers = [u for u in last["units"] if u[0].module.startswith("encoder.layer.")]
    seen = {}

    def run():
        out = workload.run()
        seen["out"] = out.last_hidden_state.clone()
        return out

    _, mixed, _ = run_step(run, minilm_store, target, set(), Judge(), units=layers[:5])
    status = {minilm_store.layers[k]["module"]: r.status for k, r in mixed.units.results.items()}
    assert status["encoder.layer.1"] == "unsupported" and status["encoder.layer.3"] == "fell back"
    assert status["encoder.layer.0"] == status["encoder.layer.4"] == "offloaded"
    with torch.no_grad():
        want = workload.run().last_hidden_state
    assert torch.equal(seen["out"], want)  # torch-cpu units are bit-exact; refused ones recomputed exactly

    _, mixed, _ = run_step(run, minilm_store, target, set(), Judge(), units=layers[5:])
    assert mixed.units.results[layers[5][1].layer].status == "offloaded"
    assert not torch.equal(seen["out"], want) and torch.isfinite(seen["out"]).all()  # the doubled values flowed on


def test_a_live_run_that_differs_from_the_carve_inside_a_unit_goes_on_with_the_reference_values(tmp_path):
    from tapml.engine import run_step
    from tapml.engine.units import Units
    from tapml.judging import Judge

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    x0 = torch.randn(3, 4)
    carve(model, lambda: model(x0), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    units = Units(store)
    chosen = [units.get(r["index"]) for r in store.layers if r["module"] in ("0", "2")]
    assert all(not isinstance(u, str) for u in chosen)
    x = torch.randn(5, 4)  # another batch: the units' inputs differ from the carve's
    _, mixed, _ = run_step(lambda: model(x), store, LocalTarget(get_platform("torch-cpu")), set(), Judge(),
                           units=chosen)
    assert "unit 0's input 2 has shape (5, 4), the carve had (3, 4)" in mixed.diverged
    got, _, _ = run_step(lambda: model(x), store, LocalTarget(get_platform("torch-cpu")), set(), Judge(),
                         units=chosen)
    with torch.no_grad():
        assert torch.equal(got, model(x))


@pytest.mark.slow
def test_every_zoo_workload_runs_top_down_on_the_identity_target_bit_exactly():
    """Stand-ins inside units must never change what the model computes: on torch-cpu every unit's outputs
    equal the carve's, and every compute op runs on the target (MoE routing with in-place index writes,
    ``full_like`` inside attention, a grouped matmul with no float64 kernel in the oracle...)."""
    from tapml.zoo import ZOO

    bad = {}
    for name in ZOO:
        run = api.offload(f"zoo:{name}", settings=Settings(platform="torch-cpu", in_process=True), plan="top-down")
        compiled = [u for u in run.units if u.status == "compiled"]
        if run.verdict != "ok" or not compiled or run.offloaded_ops != run.compute_ops \
                or any(u.propagated.max_abs != 0 for u in compiled):
            bad[name] = run.summary
    assert not bad, bad

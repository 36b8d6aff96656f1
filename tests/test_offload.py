"""The migration engine end to end: real workers, real mixed runs, real localization."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tapml.cli import main
from tapml.core import TapmlError
from tapml.engine import migrate
from tapml.judging import Judge, ToleranceTable, parse_tolerance
from tapml.platforms import open_local
from tapml.remote import RemoteTarget
from tapml.settings import Settings
from tapml.workloads import load_workload

ROOT = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers" / "failing_platforms.py"


@pytest.fixture(scope="module")
def minilm():
    return load_workload("zoo:minilm")


def offload(workload, store, target, **kw):
    settings = Settings(tolerances=kw.pop("tolerances", ()), rule=kw.pop("rule", "tolerance"))
    return migrate(workload.run, store, target, judge=settings.judge(target), **kw)


def test_torch_cpu_minilm_is_ok_with_zero_local_error(minilm, minilm_store):
    with RemoteTarget(spawn="torch-cpu") as target:
        r = offload(minilm, minilm_store, target)
    assert r.verdict == "ok" and r.culprit is None and not r.victims
    local = [o.local for o in r.ops if o.local is not None]
    unique = {o["signature"] for o in minilm_store.ops if not o["view"] and "scalar_dense" not in o["op"]}
    assert len(local) == len(unique) and all(m.max_abs == 0.0 for m in local)
    assert [s.name for s in r.steps][:2] == ["+ before encoder.layer.0", "+ encoder.layer.0"]
    assert len(r.steps) == 8 and all(s.end_to_end.max_abs == 0.0 for s in r.steps)
    assert r.coverage > 0.95 and r.counts["crashed"] == 0
    last = r.steps[-1].timing
    assert last.target_s > 0 and last.kernel_s > 0
    assert r.target_stats["runs_pipelined"] > 500  # migrate's quarantine passes pipelining on (745 over 8 steps)


def test_torch_cpu_tiny_llama_generate_is_ok(llama_generate_store):
    workload = load_workload("zoo:tiny-llama")
    target = open_local("torch-cpu")  # the engine cannot tell in-process from remote
    r = migrate(lambda: workload.run(4), llama_generate_store, target, judge=Judge())
    assert r.verdict == "ok"
    assert all(o.local.max_abs == 0.0 for o in r.ops if o.local is not None)
    assert [s.name for s in r.steps] == ["+ before layers.0", "+ layers.0", "+ layers.1", "+ after layers.1"]


def test_fault_injection_names_the_culprit_call_and_its_victims(minilm, minilm_store):
    with RemoteTarget(spawn=f"{ROOT}/examples/faulty_gelu.py:FaultyGelu") as target:
        r = offload(minilm, minilm_store, target)
    c = r.culprit
    assert r.verdict == "divergent"
    assert (c.op, c.module, c.call) == ("aten.gelu.default", "encoder.layer.3.intermediate.intermediate_act_fn", 0)
    assert c.source.endswith(".py:" + c.source.rsplit(":", 1)[1])
    assert [o.index for o in r.ops if o.status == "divergent"] == [c.index]
    assert r.victims and all(v > c.index for v in r.victims)
    assert c.victims_downstream == len(r.victims)
    victim_modules = {o.module for o in r.ops if o.victim}
    assert any(m.startswith("encoder.layer.4") for m in victim_modules)
    steps = {s.name: s.end_to_end.ok for s in r.steps}
    assert steps["+ encoder.layer.2"] and not steps["+ encoder.layer.3"]
    assert c.random_inputs.revealed  # a 1% scale error shows on any input
    assert f"{c.victims_downstream} ops downstream inherit it" in r.summary


def test_a_fault_only_realistic_inputs_trigger(minilm, minilm_store):
    """NaN for x > 8: BERT's FFN activations reach 24; N(0,1) and U(-1,1) draws never get there."""
    with RemoteTarget(spawn=f"{HELPERS}:GeluNaNAbove8") as target:
        r = offload(minilm, minilm_store, target)
    c = r.culprit
    assert c.module == "encoder.layer.0.intermediate.intermediate_act_fn"
    assert r.first_nonfinite.index == c.index and r.first_nonfinite.where == "local"
    assert c.local.nan[0] > 0 and "overflow" in c.local.why
    rnd = c.random_inputs
    assert not rnd.revealed and "missed" in rnd.summary
    assert {d.draw for d in rnd.draws} == {"normal(0,1)", "uniform(0,1)", "uniform(-1,1)"}


def test_a_crash_mid_run_costs_one_op(minilm, minilm_store):
    gelu = next(o["index"] for o in minilm_store.ops if o["op"] == "aten.gelu.default")
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(gelu))
    with RemoteTarget(spawn=f"{HELPERS}:KillSelf", spawn_options={"env": env}) as target:
        r = offload(minilm, minilm_store, target, plan="all")
    assert r.verdict == "incomplete"
    assert r.ops[gelu].status == "crashed" and r.counts["crashed"] == 1
    quarantined = [o for o in r.ops if o.reason and "quarantined" in o.reason]
    assert quarantined and all(o.status == "skipped" for o in quarantined)  # the same signature, not sent again
    assert any("quarantined" in n for n in r.notes)
    assert r.steps[0].end_to_end.ok  # the model still ran end to end, the op fell back


def test_unsupported_ops_stay_on_the_reference(minilm, minilm_store):
    with RemoteTarget(spawn=f"{HELPERS}:NoSoftmax") as target:
        r = offload(minilm, minilm_store, target, plan="all")
    softmax = [o for o in r.ops if o.op == "aten._softmax.default"]
    assert softmax and all(o.status == "unsupported" and "no softmax kernel" in o.reason for o in softmax)
    assert r.verdict == "ok" and r.steps[0].end_to_end.max_abs == 0.0
    assert r.coverage < 1.0


def test_fp16_names_the_ops_out_of_fp16_tolerance_and_why(minilm, minilm_store):
    with RemoteTarget(spawn="fp16") as target:
        r = offload(minilm, minilm_store, target, plan="all")
    assert r.compute_dtype == "float16"
    divergent = [o for o in r.ops if o.status == "divergent"]
    assert divergent and all(o.local.why for o in divergent)
    assert all(o.local.tolerance.origin == "default for float16 (torch.testing)" for o in divergent)
    whys = " ".join(o.local.why for o in divergent)
    assert "overflow" in whys and "rounding to float16" in whys  # the mask's float32 min becomes -inf
    assert r.first_nonfinite.op == "aten.scalar_tensor.default"


def test_tolerance_overrides_record_their_origin(minilm, minilm_store):
    target = open_local("fp16")
    loose = "aten.*=atol:1,rtol:1"
    r = offload(minilm, minilm_store, target, plan="all", tolerances=("atol:0,rtol:0", loose))
    tols = {o.local.tolerance.origin for o in r.ops if o.local is not None}
    assert tols == {f"--tolerance {loose}"}
    assert all(o.status != "divergent" or o.local.max_abs == float("inf") for o in r.ops)


def test_oracle_rule(minilm, minilm_store):
    target = open_local("fp16")
    plain = offload(minilm, minilm_store, target, plan="all")
    oracle = offload(minilm, minilm_store, target, plan="all", rule="oracle")
    n_plain, n_oracle = plain.counts["divergent"], oracle.counts["divergent"]
    assert oracle.rule == "oracle" and n_oracle != n_plain
    with_oracle = [o for o in oracle.ops if o.local is not None and o.local.oracle is not None]
    assert with_oracle and all(o.local.rule == "oracle" for o in with_oracle)


def test_parse_tolerance_and_config(tmp_path, monkeypatch):
    assert parse_tolerance("atol:1e-3") == (None, None, {"atol": 1e-3})
    assert parse_tolerance("aten.softmax*=atol:1e-3,rtol:0")[0:2] == ("op", "aten.softmax*")
    assert parse_tolerance("encoder.layer.3.*=rtol:1")[0] == "module"
    with pytest.raises(TapmlError, match="expected atol:X,rtol:Y"):
        parse_tolerance("softmax=tight")
    cfg = tmp_path / "tapml.toml"
    cfg.write_text('[tolerance]\natol = 0.5\n[tolerance.modules]\n"encoder.*" = {rtol = 0.25}\n')
    table = ToleranceTable.build((), str(cfg))
    t = table.resolve("aten.addmm.default", "encoder.layer.0.output.dense", "float32")
    assert (t.atol, t.rtol) == (0.5, 0.25) and t.origin.endswith("[tolerance].modules encoder.*")
    assert table.resolve("aten.add.Tensor", "pooler", "int64").origin.endswith("[tolerance]")
    assert ToleranceTable.build().resolve("aten.add.Tensor", "", "int64").atol == 0.0


def test_check_reference_reports_noise(minilm, minilm_store):
    r = offload(minilm, minilm_store, open_local("torch-cpu"), plan="all", check_reference=True)
    noise = [o.reference_noise for o in r.ops if o.reference_noise is not None]
    assert noise and all(n == 0.0 for n in noise)


def test_offload_cli_writes_run_json(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["offload", "zoo:tiny-llama", "--platform", "torch-cpu", "-o", str(out), "--json"])
    brief = json.loads(capsys.readouterr().out)
    assert code == 0 and brief["verdict"] == "ok"
    record = json.loads((out / "run.json").read_text())
    assert "culprit" not in record  # an ok run has none; absent fields are null by the schema
    for key in ("schema", "verdict", "victims", "counts", "coverage", "ops", "steps"):
        assert key in record
    op = next(o for o in record["ops"] if o.get("local"))
    for key in ("index", "op", "module", "status", "local", "tolerance"):
        assert key in op
    assert (out / "store" / "manifest.json").exists()
    # reuse the carve; a mismatched model is refused
    code = main(["offload", "zoo:tiny-llama", "--platform", "torch-cpu", "--store", str(out / "store"),
                 "-o", str(tmp_path / "again"), "--plan", "single"])
    assert code == 0
    code = main(["offload", "zoo:minilm", "--platform", "torch-cpu", "--store", str(out / "store"),
                 "-o", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "was carved from zoo:tiny-llama" in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args, message", [
    (["--platform", "nope"], "unknown platform 'nope'"),
    (["--platform", "torch-cpu", "--tolerance", "x=y"], "expected atol:X,rtol:Y"),
    (["--platform", "torch-cpu", "--layers", "("], "not a valid regex"),
])
def test_offload_bad_input(tmp_path, capsys, args, message):
    code = main(["offload", "zoo:tiny-llama", "-o", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_tvm_llvm_minilm_tells_the_truth(minilm, minilm_store):
    """The README's main job: TVM's wrongly shaped layer-norm mean/rstd are dead outputs (findings), its
    addmm summation order is within bounds, and every compute op runs on TVM."""
    with RemoteTarget(spawn="tvm-llvm") as target:
        r = offload(minilm, minilm_store, target, rule="bound")
    assert r.verdict == "ok" and r.culprit is None, r.summary
    assert r.counts["crashed"] == 0 and r.counts["timeout"] == 0 and r.coverage == 1.0
    dead = [f for f in r.findings if f.kind == "dead-output"]
    assert dead and all(f.op == "aten.native_layer_norm.default" for f in dead)
    addmm = [o for o in r.ops if o.op == "aten.addmm.default" and o.local is not None]
    assert addmm and all(0 < o.local.bound.ratio < 1 for o in addmm)
    assert r.end_to_end.bound.ratio < 1 and len(r.steps) == 8


def test_nondeterministic_ops_report_reference_noise(tmp_path):
    import torch

    from tapml.carving import FixtureStore, carve

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)).train()
    x = torch.randn(4, 8)
    carve(model, lambda: model(x), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    r = migrate(lambda: model(x), store, open_local("torch-cpu"), judge=Judge(), plan="all")
    random_ops = [o for o in r.ops if "nondeterministic" in (o.reason or "")]
    assert random_ops and all(o.status == "skipped" for o in random_ops)
    assert any((o.reference_noise or 0) > 0 for o in random_ops)  # the reference differs from itself


def test_generation_reports_the_first_differing_token(tmp_path):
    workload = load_workload("zoo:tiny-llama")
    from tapml.carving import FixtureStore, carve

    carve(workload.model, lambda: workload.run(4), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    with RemoteTarget(spawn=f"{HELPERS}:SecondDecodeLogits") as target:
        r = migrate(lambda: workload.run(4), store, target, judge=Judge())
    t = r.tokens
    assert t.first_difference == 8 + 2 and t.first_difference_generated == 2 and t.step == "decode 2"
    assert t.target[10] == 5 and t.reference[10] != 5
    assert r.culprit.module == "lm_head" and r.culprit.call == 2 and r.culprit.step == "decode 2"
    assert "first differ at position 10" in r.summary
    assert [s.tokens.first_difference for s in r.steps] == [None, None, None, 10]

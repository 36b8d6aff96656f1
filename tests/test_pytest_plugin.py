"""The pytest plugin and emitted tests, run as a user runs them: pytest in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from tapml.cli import main
from tapml.remote import spawn_worker

ROOT = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers" / "failing_platforms.py"
FAULTY = f"{ROOT}/examples/faulty_gelu.py:FaultyGelu"


def pytest_run(*args, cwd, env=None):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, env=env or dict(os.environ), timeout=600)
    return proc


def junit_outcomes(path: Path) -> dict[str, str]:
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        out[case.get("name")] = kind
    return out


@pytest.fixture(scope="module")
def store(minilm_store):
    return minilm_store


def test_collects_unique_signatures_with_readable_ids(store, tmp_path):
    proc = pytest_run("--collect-only", "-q", "--tapml-store", store.path, cwd=tmp_path)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(ids) == len({op["signature"] for op in store.ops})
    addmm = next(op for op in store.ops if op["module"] == "encoder.layer.0.attention.self.query"
                 and op["op"] == "aten.addmm.default")
    expected = (f"manifest.json::{addmm['index']:04d}-aten.addmm.default"
                "[encoder.layer.0.attention.self.query#0][torch-cpu]")
    assert any(line.endswith(expected) for line in ids)
    proc = pytest_run("--collect-only", "-q", "--tapml-store", store.path, "-k", "addmm and layer.3", cwd=tmp_path)
    assert sum("::" in line for line in proc.stdout.splitlines()) == 0  # unique signatures: layer 0 holds them
    proc = pytest_run("--collect-only", "-q", "--tapml-store", store.path, "--tapml-all-calls", "-k",
                      "addmm and layer.3", cwd=tmp_path)
    selected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(selected) == 6 and all("[encoder.layer.3." in line and "#0]" in line for line in selected)
    proc = pytest_run("--collect-only", "-q", "--tapml-store", store.path, "-k", "softmax", cwd=tmp_path)
    assert sum("::" in line for line in proc.stdout.splitlines()) == 1
    proc = pytest_run("--collect-only", "-q", "--tapml-store", store.path, "-m", "view", cwd=tmp_path)
    assert all(".view." in line or "transpose" in line or ".t." in line or "expand" in line or "slice" in line
               or "unsqueeze" in line or "select" in line for line in proc.stdout.splitlines() if "::" in line)


@pytest.mark.parametrize("platform", ["fp16", pytest.param("tvm-llvm", marks=pytest.mark.slow)])
def test_counts_match_the_isolated_pass_of_offload(store, tmp_path, platform):
    run = tmp_path / "run"
    verdict = main(["offload", "zoo:minilm", "--platform", platform, "--store", str(store.path), "-o", str(run),
                    "--plan", "all"])
    isolated = json.loads((run / "run.json").read_text())["isolated_counts"]
    summary = tmp_path / "summary.json"
    proc = pytest_run("--tapml-store", store.path, "--tapml-platform", platform, "--junitxml", tmp_path / "j.xml",
                      "--tapml-json", summary, cwd=tmp_path)
    outcomes = Counter(junit_outcomes(tmp_path / "j.xml").values())
    assert proc.returncode == (1 if isolated["divergent"] else 0) and verdict in (0, 1)
    assert outcomes["passed"] == isolated["ok"] and outcomes["failure"] == isolated["divergent"]
    assert outcomes["skipped"] == isolated["unsupported"] + isolated["skipped"]
    assert json.loads(summary.read_text())["counts"] == {k: v for k, v in isolated.items() if v}
    assert "carved op signatures (the first call of each): " in proc.stdout
    assert json.loads(summary.read_text())["unit"] == "signatures"
    root = ET.parse(tmp_path / "j.xml").getroot()
    props = {p.get("name") for p in root.iter("property")}
    assert {"tapml_max_abs", "tapml_status", "tapml_cosine"} <= props


def test_fault_injection_fails_exactly_the_culprit_readably(store, tmp_path):
    proc = pytest_run("--tapml-store", store.path, "--tapml-platform", FAULTY, "--tapml-all-calls",
                      "--tapml-artifacts", tmp_path / "art", cwd=tmp_path)
    assert proc.returncode == 1
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    gelu = next(op["index"] for op in store.ops if op["module"] == "encoder.layer.3.intermediate.intermediate_act_fn")
    assert len(failed) == 1
    assert f"{gelu:04d}-aten.gelu.default[encoder.layer.3.intermediate.intermediate_act_fn#0][faulty-gelu]" in failed[0]
    assert "carved ops (every call): " in proc.stdout
    assert "Traceback" not in proc.stdout and "Error" not in proc.stdout.split("FAILURES")[1].split("tapml ==")[0]
    for text in ("out of tolerance", "index |     expected |          got |", "allowed", "repro: tapml replay",
                 "from default for float32 (torch.testing)"):
        assert text in proc.stdout
    assert len(list((tmp_path / "art").glob("*.safetensors"))) == 1


def test_skips_name_the_op_not_the_plugin(store, tmp_path):
    proc = pytest_run("--tapml-store", store.path, "-rs", "-k", "view", cwd=tmp_path)
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and "pytest_plugin.py" not in proc.stdout
    line = re.compile(rf"SKIPPED \[1\] \S*{store.path.name}: op (\d+) \((aten\.view\.default) in (\S+)#(\d+)\) "
                      r"skipped: view op \(no compute\)")
    found = [m for m in map(line.match, skipped) if m]
    assert found, skipped
    op = store.ops[int(found[0].group(1))]
    assert (op["op"], op["module"] or "(model)", op["call"]) == (found[0].group(2), found[0].group(3),
                                                                   int(found[0].group(4)))


def test_ini_and_pyproject_settings(store, tmp_path):
    (tmp_path / "pyproject.toml").write_text(f'[tool.pytest.ini_options]\ntapml_store = "{store.path}"\n'
                                             '[tool.tapml]\nplatform = "bf16"\n')
    proc = pytest_run("--collect-only", "-q", cwd=tmp_path)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids and all(line.endswith("[bf16]") for line in ids)


def test_tapml_test_wrapper(store, capsys):
    assert main(["test", str(store.path), "--platform", "torch-cpu", "-q", "-k", "addmm"]) == 0
    assert main(["test", str(store.path), "--platform", FAULTY, "--all-calls", "-q", "-k", "gelu"]) == 1


def two_devices(env):
    return [spawn_worker(f"{HELPERS}:KillSelf", token="pool-token", env=env) for _ in range(2)]


def test_xdist_pool_one_device_per_worker_and_rescheduling(store, tmp_path):
    token = tmp_path / "token"
    token.write_text("pool-token")
    victim = next(op["index"] for op in store.ops if op["op"] == "aten.gelu.default")
    # whichever device reaches that op first dies; the other one survives it
    devices = two_devices(dict(os.environ, TAPML_TEST_OP_INDEX=str(victim),
                               TAPML_TEST_KILL_ONCE=str(tmp_path / "killed")))
    pool = ",".join(d.address for d in devices)
    try:
        common = ["--tapml-store", store.path, "--tapml-remote", pool, "--tapml-token-file", token,
                  "--tapml-platform", "kill-self"]
        serial = pytest_run("--collect-only", "-q", *common, cwd=tmp_path)
        parallel = pytest_run("--collect-only", "-q", "-n", "2", *common, cwd=tmp_path)
        ids = sorted(line for line in serial.stdout.splitlines() if "::" in line)
        assert ids and len(ids) == len({op["signature"] for op in store.ops})
        assert f"{len(ids)} tests collected" in parallel.stdout or f"{len(ids)} items" in parallel.stdout
        proc = pytest_run("-n", "2", "--dist", "load", *common, "--junitxml", tmp_path / "j.xml", cwd=tmp_path)
        outcomes = junit_outcomes(tmp_path / "j.xml")
        assert "failure" not in outcomes.values(), proc.stdout[-3000:]
        assert "rescheduled to another device" in proc.stdout
        assigned = {p.get("value") for p in ET.parse(tmp_path / "j.xml").getroot().iter("property")
                    if p.get("name") == "tapml_assigned_device"}
        assert assigned == {d.address for d in devices}  # one device per xdist worker
        assert sorted(d.alive() for d in devices) == [False, True]
    finally:
        for d in devices:
            d.stop()


def test_a_dead_device_is_an_error_not_a_failure(store, tmp_path):
    token = tmp_path / "token"
    token.write_text("pool-token")
    victim = next(op["index"] for op in store.ops if op["op"] == "aten.gelu.default")
    device = spawn_worker(f"{HELPERS}:KillSelf", token="pool-token",
                          env=dict(os.environ, TAPML_TEST_OP_INDEX=str(victim)))
    try:
        proc = pytest_run("--tapml-store", store.path, "--tapml-remote", device.address, "--tapml-token-file", token,
                          "--tapml-platform", "kill-self", "--junitxml", tmp_path / "j.xml", "-k", "gelu or softmax",
                          cwd=tmp_path)
        outcomes = junit_outcomes(tmp_path / "j.xml")
        assert "failure" not in outcomes.values()
        assert "error" in outcomes.values() and proc.returncode == 1
        assert "crashed on kill-self" in proc.stdout
    finally:
        device.stop()


def test_emitted_tests_pass_with_plain_pytest_elsewhere(store, tmp_path, capsys):
    out = tmp_path / "carved"
    assert main(["emit-tests", str(store.path), "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["emitted"] > 30 and not result["not_reproducible"]
    assert {p.name for p in out.iterdir()} == {"test_carved_ops.py", "conftest.py", "carved_store"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = pytest_run(out, "-q", cwd=elsewhere, env={k: v for k, v in os.environ.items()
                                                      if not k.startswith("PYTEST")})
    assert proc.returncode == 0 and f"{result['emitted']} passed" in proc.stdout, proc.stdout[-2000:]
    env = dict(os.environ, TAPML_PLATFORM=FAULTY)
    proc = pytest_run(out, "-q", "-k", "gelu", cwd=elsewhere, env=env)
    assert proc.returncode == 0  # only the first gelu call was emitted; the fault is in layer 3
    source = (out / "test_carved_ops.py").read_text()
    gelu = next(op for op in store.ops if op["op"] == "aten.gelu.default")
    assert source.count("\n@carved_op(") == result["emitted"]
    assert (f"id='{gelu['module']}#0')  # op {gelu['index']} of the carve, activations.py:89\n"
            f"def test_{gelu['index']:04d}_aten_gelu_default(x):\n    return torch.ops.aten.gelu.default(x)") in source


def test_emitted_tests_read_as_op_calls_and_fail_with_numbers(store, tmp_path, capsys):
    out = tmp_path / "carved"
    assert main(["emit-tests", str(store.path), "-o", str(out), "--only", "aten.gelu*", "--all-calls"]) == 0
    elsewhere = tmp_path / "fresh-repo"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = pytest_run(out, "-q", cwd=elsewhere, env=dict(env, TAPML_PLATFORM=FAULTY))
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert proc.returncode == 1 and len(failed) == 1, proc.stdout[-3000:]
    assert "aten_gelu_default[encoder.layer.3.intermediate.intermediate_act_fn#0]" in failed[0]
    assert "Traceback" not in proc.stdout and "on faulty-gelu" in proc.stdout
    for text in ("index |     expected |          got |", "allowed", "bound: ", "× the error a correct",
                 "tolerance: atol 1e-05, rtol 1.3e-06 — from default for float32 (torch.testing)"):
        assert text in proc.stdout, text
    selected = pytest_run(out, "-q", "-k", "gelu and layer.3", cwd=elsewhere, env=dict(env, TAPML_PLATFORM=FAULTY))
    assert "1 failed, 5 deselected" in selected.stdout
    loose = dict(env, TAPML_PLATFORM=FAULTY, TAPML_RULE="tolerance", TAPML_TOLERANCE="aten.gelu*=atol:0.2,rtol:0")
    assert pytest_run(out, "-q", cwd=elsewhere, env=loose).returncode == 0  # the knob
    source = out / "test_carved_ops.py"
    source.write_text(source.read_text().replace("torch.ops.aten.gelu.default(x)",
                                                 "torch.ops.aten.gelu.default(x, approximate='tanh')", 1))
    proc = pytest_run(out, "-q", cwd=elsewhere, env=env)
    assert proc.returncode == 1 and "does not reproduce carved op 0 on the reference" in proc.stdout


def test_emit_refuses_ops_that_do_not_reproduce(store, tmp_path, monkeypatch):
    import tapml.emit as emit
    from tapml.carving import Mismatch, ReplayReport

    def fake_replay(store, indices):
        indices = list(indices)
        return ReplayReport(checked=len(indices), mismatches=[Mismatch(indices[0], "x", "", "bytes differ")])

    monkeypatch.setattr(emit, "replay", fake_replay)
    result = emit.emit_tests(store, tmp_path / "carved", only="aten.addmm*")
    assert result["emitted"] == 3 and list(result["not_reproducible"].values()) == ["bytes differ"]


FUSION = f"{HELPERS}:FusionBug"


def first_unit_checks(record: dict) -> Counter:
    """The run's isolated unit pass: the first call of each signature among the units it ran, ok or not."""
    seen, out = set(), Counter()
    for u in record["units"]:
        if u["status"] in ("compiled", "failed") and u["signature"] not in seen:
            seen.add(u["signature"])
            out["passed" if u["local"]["ok"] else "failure"] += 1
    return out


@pytest.mark.parametrize("platform", ["torch-cpu", "fp16"])
def test_module_items_match_the_isolated_unit_pass_of_a_top_down_run(store, tmp_path, platform):
    run = tmp_path / "run"
    main(["offload", "zoo:minilm", "--platform", platform, "--store", str(store.path), "-o", str(run),
          "--plan", "top-down"])
    expected = first_unit_checks(json.loads((run / "run.json").read_text()))
    summary = tmp_path / "summary.json"
    proc = pytest_run("--tapml-store", store.path, "--tapml-platform", platform, "--tapml-units", "modules",
                      "--junitxml", tmp_path / "j.xml", "--tapml-json", summary, cwd=tmp_path)
    outcomes = Counter(junit_outcomes(tmp_path / "j.xml").values())
    assert outcomes == expected and sum(expected.values()) == 3, proc.stdout[-3000:]  # embeddings, layer, pooler
    assert proc.returncode == (1 if expected["failure"] else 0)
    assert "module unit signatures (the first call of each): " in proc.stdout
    written = json.loads(summary.read_text())
    assert written["unit"] == "module signatures" and sum(written["counts"].values()) == 3
    assert set(written["by_op"]) == {"BertEmbeddings", "BertLayer", "BertPooler"}


def test_a_graph_level_fault_fails_the_module_item_of_its_call(store, tmp_path):
    """FusionBug corrupts encoder.layer.2 compiled whole. One item per signature tests layer 0 for all six
    layers and passes, as the run's isolated pass of first calls does; --tapml-all-calls tests every layer
    and fails layer 2 alone, selectable with -k by its module path."""
    args = ["--tapml-store", store.path, "--tapml-platform", FUSION, "--tapml-units", "modules",
            "--tapml-in-process"]
    proc = pytest_run("--collect-only", "-q", *args, cwd=tmp_path)
    ids = [line.split("::")[1] for line in proc.stdout.splitlines() if "::" in line]
    assert ids == ["unit-0000-BertEmbeddings[embeddings#0][fusion-bug]",
                   "unit-0037-BertLayer[encoder.layer.0#0][fusion-bug]", "unit-0379-BertPooler[pooler#0][fusion-bug]"]
    proc = pytest_run(*args, cwd=tmp_path)
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout[-3000:]
    assert "later calls of a signature are not tested on their own" in proc.stdout
    proc = pytest_run(*args, "--tapml-all-calls", "--junitxml", tmp_path / "j.xml", cwd=tmp_path)
    outcomes = junit_outcomes(tmp_path / "j.xml")
    assert len(outcomes) == 8 and [n for n, o in outcomes.items() if o != "passed"] == \
        ["unit-0151-BertLayer[encoder.layer.2#0][fusion-bug]"], proc.stdout[-3000:]
    assert proc.returncode == 1 and "Traceback" not in proc.stdout
    for text in ("encoder.layer.2 (BertLayer, call 0, carved ops [151, 208)) compiled as one unit on", "bound: ",
                 "× the error a correct", "index |     expected |          got |", "--plan top-down",
                 "module units (every call): 7 ok, 1 divergent"):
        assert text in proc.stdout, text
    selected = pytest_run(*args, "--tapml-all-calls", "-q", "-k", "encoder.layer.2", cwd=tmp_path)
    assert "1 failed, 7 deselected" in selected.stdout
    bad = pytest_run("--tapml-store", store.path, "--tapml-units", "layers", cwd=tmp_path)
    assert bad.returncode == 4 and "--tapml-units layers: choose ops or modules" in bad.stderr


def test_emitted_module_tests_run_elsewhere_and_fail_on_a_fused_fault(store, tmp_path, capsys):
    out = tmp_path / "carved"
    assert main(["emit-tests", str(store.path), "-o", str(out), "--units", "modules", "--all-calls", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["emitted"] == 8 and not result["not_reproducible"]
    assert {p.name for p in out.iterdir()} == {"test_carved_units.py", "carved_units.json", "conftest.py",
                                               "carved_store"}
    source = (out / "test_carved_units.py").read_text()
    assert source.count("\n@carved_unit(") == 8
    assert ("@carved_unit(3, id='encoder.layer.2#0')  # BertLayer: carved ops [151, 208), layer 42 of the carve\n"
            "def test_unit_0151_BertLayer():\n    \"\"\"encoder.layer.2 (BertLayer) compiled whole: 57 ops") in source
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = pytest_run(out, "-q", cwd=elsewhere, env=env)
    assert proc.returncode == 0 and "8 passed" in proc.stdout, proc.stdout[-2000:]
    proc = pytest_run(out, "-q", cwd=elsewhere, env=dict(env, TAPML_PLATFORM=FUSION))
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert proc.returncode == 1 and len(failed) == 1, proc.stdout[-3000:]
    assert "test_unit_0151_BertLayer[encoder.layer.2#0]" in failed[0]
    assert "compiled as one unit on fusion-bug" in proc.stdout and "Traceback" not in proc.stdout
    assert "bound: " in proc.stdout and "(rule: bound)" in proc.stdout
    assert main(["emit-tests", str(store.path), "-o", str(tmp_path / "one"), "--units", "modules", "--only",
                 "encoder.*"]) == 0
    assert "1 tests written" in capsys.readouterr().out  # one BertLayer signature
    units = json.loads((out / "carved_units.json").read_text())["units"]
    units[0]["unit"]["nodes"][0]["op"] = "aten.mul.Tensor"  # an edited program no longer reproduces
    (out / "carved_units.json").write_text(json.dumps({"units": units}))
    proc = pytest_run(out, "-q", "-k", "embeddings", cwd=elsewhere, env=env)
    assert proc.returncode == 1 and "does not reproduce its carved outputs on the reference" in proc.stdout

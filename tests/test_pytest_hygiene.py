"""The pytest plugin never breaks pytest: a project that never mentions tapml sees no change."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from tapml.carving import carve
from tapml.judging import ToleranceTable, split_tolerances
from tapml.settings import Settings

PLAIN = '''
import pytest

@pytest.fixture
def two():
    return 2

def test_pass(two):
    assert two == 2

def test_fail():
    assert 1 == 2

@pytest.mark.skip(reason="not today")
def test_skip():
    pass

@pytest.mark.parametrize("x", [1, 2, 3])
def test_param(x):
    assert x
'''


def pytest_run(*args, cwd, env=None):
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def _outcome(proc) -> str:
    return re.findall(r"=+ (.*) in [\d.]+s", proc.stdout)[-1]


@pytest.fixture
def plain(tmp_path):
    (tmp_path / "test_plain.py").write_text(PLAIN)
    return tmp_path


@pytest.mark.parametrize("extra", [[], ["-p", "no:xdist"], ["-n", "2"]], ids=["default", "no-xdist", "xdist"])
def test_a_plain_suite_runs_identically_with_tapml_installed(plain, extra):
    without = pytest_run("-p", "no:tapml", *extra, cwd=plain)
    with_tapml = pytest_run(*extra, cwd=plain)
    assert "INTERNALERROR" not in with_tapml.stdout + with_tapml.stderr, with_tapml.stdout[-3000:]
    assert with_tapml.returncode == without.returncode == 1
    assert _outcome(with_tapml) == _outcome(without) == "1 failed, 4 passed, 1 skipped"
    collected = pytest_run("--collect-only", "-q", *extra, cwd=plain).stdout
    assert collected.splitlines()[:6] == pytest_run("-p", "no:tapml", "--collect-only", "-q", *extra,
                                                    cwd=plain).stdout.splitlines()[:6]


def test_no_markers_or_state_unless_asked(plain):
    assert pytest_run("--markers", cwd=plain).stdout == pytest_run("-p", "no:tapml", "--markers", cwd=plain).stdout
    asked = pytest_run("--markers", "--tapml-platform", "torch-cpu", cwd=plain).stdout
    assert "@pytest.mark.tapml" in asked


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Softmax(dim=-1)).eval()
    x = torch.randn(2, 8)
    path = tmp_path_factory.mktemp("stores") / "tiny"
    carve(model, lambda: model(x), path)
    return path


def test_only_tapml_manifests_are_collected(tmp_path, tiny_store):
    lookalike = tmp_path / "data"
    (lookalike / "tensors").mkdir(parents=True)
    (lookalike / "manifest.json").write_text('{"name": "a dataset, not a store"}')
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    proc = pytest_run("--collect-only", "-q", tmp_path, lookalike / "manifest.json", cwd=tmp_path)
    assert "manifest.json::" not in proc.stdout and "test_one.py::test_one" in proc.stdout
    proc = pytest_run("--collect-only", "-q", tiny_store / "manifest.json", cwd=tmp_path)
    assert proc.returncode == 0 and "manifest.json::0000-aten.t.default" in proc.stdout, proc.stdout[-2000:]


def test_the_store_path_does_not_move_the_rootdir(tmp_path, tiny_store):
    work = tmp_path / "project"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "tapml.cli", "test", str(tiny_store)], cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert f"rootdir: {work}" in proc.stdout


SPEC = "atol:0,rtol:0,aten._softmax*=atol:1,rtol:1"


def test_one_tolerance_parser_for_cli_config_and_plugin(tmp_path):
    assert split_tolerances(SPEC) == ["atol:0,rtol:0", "aten._softmax*=atol:1,rtol:1"]
    cli = Settings(tolerances=(SPEC,)).table
    plugin = ToleranceTable.build(split_tolerances(SPEC))
    cfg = tmp_path / "t.toml"
    cfg.write_text('[tolerance]\natol = 0\nrtol = 0\n[tolerance.ops]\n"aten._softmax*" = {atol = 1, rtol = 1}\n')
    config = ToleranceTable.build((), str(cfg))
    for table in (cli, plugin, config):
        soft = table.resolve("aten._softmax.default", "", "float32")
        add = table.resolve("aten.add.Tensor", "", "float32")
        assert (soft.atol, soft.rtol, add.atol, add.rtol) == (1, 1, 0, 0)


def test_the_plugin_applies_a_comma_joined_tolerance(tmp_path, tiny_store):
    proc = pytest_run("--tapml-store", tiny_store, "--tapml-platform", "fp16", "--tapml-tolerance", SPEC,
                      "--tapml-rule", "tolerance", "--junitxml", tmp_path / "j.xml", cwd=tmp_path)
    outcomes = {}
    for case in ET.parse(tmp_path / "j.xml").getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        outcomes[case.get("name").split("-", 1)[1].split("[")[0]] = kind
    assert outcomes["aten._softmax.default"] == "passed"  # its own loose tolerance
    assert outcomes["aten.addmm.default"] == "failure"  # the global exact one: rtol:1 did not leak
    assert proc.returncode == 1


def test_bad_tolerance_in_the_plugin_is_a_usage_error(tmp_path, tiny_store):
    proc = pytest_run("--tapml-store", tiny_store, "--tapml-tolerance", "atol:nan", cwd=tmp_path)
    assert proc.returncode == 4 and "atol must be a finite number" in proc.stderr and "Traceback" not in proc.stderr


def test_installed_plugin_entry_point_is_tapml():
    from importlib.metadata import entry_points

    assert any(ep.value == "tapml.pytest_plugin" for ep in entry_points(group="pytest11"))
    assert Path(__file__).parent.joinpath("conftest.py").exists()

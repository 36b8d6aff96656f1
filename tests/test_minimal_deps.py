"""tapml from a source tree with torch and its small dependencies only (issue 18's GPU box).

A ``sitecustomize`` on PYTHONPATH makes TVM, wgpu, matplotlib and transformers unfindable (as
absent packages are: ``find_spec`` returns None) and hides the editable install, so
``python -m tapml`` runs from the checkout as it would on a machine with a preinstalled CUDA
torch and a carried folder of small dependencies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ABSENT = ("tvm", "tvm_ffi", "wgpu", "matplotlib", "transformers")

BLOCKER = '''
import os, sys
from importlib.machinery import PathFinder

ABSENT = set(os.environ["TAPML_TEST_ABSENT"].split(","))
_find = PathFinder.find_spec.__func__


def find_spec(cls, fullname, path=None, target=None):
    if fullname.split(".")[0] in ABSENT:
        return None  # as if not installed
    return _find(cls, fullname, path, target)


PathFinder.find_spec = classmethod(find_spec)
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
'''


@pytest.fixture
def bare(tmp_path):
    """Run ``python -m tapml ARGS`` (or ``python -c CODE``) from the source tree with the heavy packages absent."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}", "TAPML_TEST_ABSENT": ",".join(ABSENT),
           "NO_COLOR": "1"}
    env.pop("TAPML_DEBUG", None)

    def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-c", code] if code is not None else [sys.executable, "-m", "tapml", *args]
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    return run


def test_the_blocker_hides_the_heavy_packages_and_the_install(bare):
    r = bare(code="import importlib.util as u, tapml.carving as c; "
                  f"print([n for n in {ABSENT!r} if u.find_spec(n)], c.__file__)")
    assert r.returncode == 0, r.stderr
    absent, where = r.stdout.split("] ")
    assert absent == "["
    assert Path(where.strip()).is_relative_to(ROOT / "carving")


def test_carve_offload_replay_run_with_torch_alone(bare, tmp_path):
    r = bare("carve", "zoo:tiny-llama", "-o", "store", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ops"] > 100
    r = bare("offload", "zoo:tiny-llama", "--platform", "torch-cpu", "--store", "store", "-o", "run")
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["verdict"] == "ok" and record["reference"]["device"] == "cpu"
    assert "matplotlib is not installed" in (tmp_path / "run" / "report.html").read_text()
    r = bare("replay", "store", "--platform", "torch-cpu", "--json")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("platform", "package"), [("tvm-llvm", "tvm"), ("tvm-webgpu", "tvm")])
def test_a_platform_whose_library_is_absent_is_refused_in_one_line(bare, platform, package):
    r = bare("offload", "zoo:tiny-llama", "--platform", platform, "-o", "run")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and package in r.stderr and "not available here" in r.stderr


def test_a_zoo_entry_needing_an_absent_package_names_it(bare):
    r = bare("carve", "zoo:gpt2", "-o", "store")
    assert r.returncode == 2
    assert r.stderr.strip() == ("tapml: error: model zoo:gpt2 needs the Python package 'transformers', "
                                "which is not installed here")

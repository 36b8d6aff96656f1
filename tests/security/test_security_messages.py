"""Bad input is one line and exit 2; infrastructure failures under pytest are one short ERROR each."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tapml.carving import carve
from tapml.cli import main

HELPERS = Path(__file__).resolve().parent.parent / "helpers" / "failing_platforms.py"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    x = torch.randn(2, 8)
    path = tmp_path_factory.mktemp("s") / "store"
    carve(model, lambda: model(x), path)
    return path


def one_line_exit_2(capsys, args, message):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flags, message", [
    (["--timeout", "0"], "--timeout must be a positive number"),
    (["--timeout", "-1"], "--timeout must be a positive number"),
    (["--timeout", "nan"], "--timeout must be a positive number"),
    (["--tolerance", "atol:nan"], "atol must be a finite number >= 0"),
    (["--tolerance", "rtol:-1"], "rtol must be a finite number >= 0"),
])
def test_bad_numbers_are_refused(capsys, store, flags, message):
    one_line_exit_2(capsys, ["replay", str(store), "--platform", "torch-cpu", *flags], message)


def test_a_config_with_a_non_number_and_a_config_directory(capsys, store, tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[tolerance]\natol = "abc"\n')
    one_line_exit_2(capsys, ["replay", str(store), "--platform", "torch-cpu", "--config", str(cfg)],
                    "atol = 'abc' is not a number")
    one_line_exit_2(capsys, ["replay", str(store), "--platform", "torch-cpu", "--config", str(tmp_path)],
                    "is a directory, not a TOML file")


def test_inspect_a_file(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    one_line_exit_2(capsys, ["inspect", str(f)], "is a file, not a fixture store")


@pytest.mark.parametrize("where", ["factory", "forward"])
def test_sys_exit_in_a_factory_or_a_model_is_reported(capsys, tmp_path, where):
    factory = tmp_path / "m.py"
    if where == "factory":
        factory.write_text("import sys\ndef build():\n    sys.exit(0)\n")
    else:
        factory.write_text("import sys, torch\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
                           "        sys.exit(0)\ndef build():\n    return M(), (torch.zeros(1),)\n")
    one_line_exit_2(capsys, ["carve", f"{factory}:build", "-o", str(tmp_path / "out")], "SystemExit")
    assert not (tmp_path / "out").exists()


def _error_sections(stdout: str) -> list[str]:
    """The body of each setup ERROR report pytest printed."""
    errors = stdout.split(" ERRORS =", 1)[1] if " ERRORS =" in stdout else ""
    errors = re.split(r"\n=+ .* =+\n", "\n" + errors.split("\n", 1)[-1])[0]
    return re.split(r"_+ ERROR at setup of .* _+\n", errors)[1:]


def test_a_crashed_op_is_one_short_error_under_pytest(store, tmp_path):
    from tapml.carving import FixtureStore

    gelu = next(op["index"] for op in FixtureStore(store).ops if op["op"] == "aten.gelu.default")
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(gelu))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tapml-store", str(store),
                           "--tapml-platform", f"{HELPERS}:KillSelf"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 1 and "1 error" in proc.stdout, proc.stdout[-3000:]
    (section,) = _error_sections(proc.stdout)
    assert "crashed on" in section and "aten.gelu.default" in section
    assert len(section.strip().splitlines()) <= 6 and "pluggy" not in section and "Traceback" not in section


def test_a_broken_store_is_one_short_error_per_item_under_pytest(store, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    shard = next((broken / "tensors").iterdir())
    data = bytearray(shard.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 3] ^= 0xFF  # the first stored tensor: an op input
    shard.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tapml-store", str(broken)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    sections = _error_sections(proc.stdout)
    assert proc.returncode == 1 and sections
    assert all(len(s.strip().splitlines()) <= 4 and "content key" in s for s in sections)
    assert len(proc.stdout.splitlines()) < 40 + 6 * len(sections)

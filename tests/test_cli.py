"""The CLI contract: JSON keys, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tapml.cli import main

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def good():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.GELU()), (torch.randn(2, 4),)

    def raises():
        raise RuntimeError("weights not found")

    def wrong():
        return 42
    """
)


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(FACTORY)
    return path


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_zoo_json(capsys):
    code, out, _ = run(["zoo", "--json"], capsys)
    entries = json.loads(out)
    assert code == 0 and {"zoo:minilm", "zoo:tiny-llama"} <= {e["spec"] for e in entries}
    assert all(e["name"] and e["description"] for e in entries)


def test_carve_user_factory_then_inspect(tmp_path, factory_file, capsys):
    out_dir = tmp_path / "store"
    code, out, _ = run(["carve", f"{factory_file}:good", "-o", str(out_dir), "--json", "--verify-replay"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["replay"]["fidelity"] == 1.0 and summary["ops"] > 0
    code, out, _ = run(["inspect", str(out_dir), "--json"], capsys)
    summary = json.loads(out)
    assert code == 0
    for key in ("ops", "layers", "unique_signatures", "stored_bytes", "unique_tensor_bytes", "verified"):
        assert key in summary
    assert summary["verified"] is True


def test_carve_module_factory(tmp_path, factory_file, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    code, _, _ = run(["carve", "mymodel:good", "-o", str(tmp_path / "s")], capsys)
    assert code == 0 and (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("zoo:nope", "no zoo workload 'nope'"),
        ("nosuchfile.py:f", "model file nosuchfile.py does not exist"),
        ("no_such_pkg_xyz.mod:f", "cannot import module"),
        ("justaname", "is not zoo:NAME"),
        ("{factory}:raises", "raised RuntimeError: weights not found"),
        ("{factory}:wrong", "must return (model, inputs)"),
        ("{factory}:missing", "has no 'missing'"),
    ],
)
def test_bad_model_specs(tmp_path, factory_file, capsys, spec, message):
    out_dir = tmp_path / "out"
    code, out, err = run(["carve", spec.format(factory=factory_file), "-o", str(out_dir)], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == [factory_file]  # nothing half-written


def test_existing_output_and_unwritable_dir(tmp_path, factory_file, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run(["carve", f"{factory_file}:good", "-o", str(out_dir)], capsys)
    assert code == 2 and "already exists; pass --force" in err
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    code, _, err = run(["carve", f"{factory_file}:good", "-o", str(blocker / "s")], capsys)
    assert code == 2 and "cannot write" in err


def test_model_that_raises_midway(tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text(textwrap.dedent("""
        import torch
        class M(torch.nn.Module):
            def forward(self, x):
                return x @ torch.ones(5, 5)  # shape mismatch
        def f():
            return M(), torch.ones(2, 3)
    """))
    code, _, err = run(["carve", f"{path}:f", "-o", str(tmp_path / "s")], capsys)
    assert code == 2 and "raised while carving" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.py"]


def test_inspect_bad_stores(tmp_path, factory_file, capsys):
    code, _, err = run(["inspect", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "not a fixture store" in err
    store = tmp_path / "s"
    run(["carve", f"{factory_file}:good", "-o", str(store)], capsys)
    shard = next((store / "tensors").iterdir())
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    code, _, err = run(["inspect", str(store)], capsys)
    assert code == 2 and shard.name in err and len(err.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    env = dict(os.environ, TAPML_DEBUG="1")
    proc = subprocess.run([sys.executable, "-m", "tapml.cli", "inspect", str(tmp_path / "x")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_console_script_minilm(tmp_path):
    """The documented command, as a user types it: ≥ 200 ops, verified."""
    tapml = os.path.join(os.path.dirname(sys.executable), "tapml")
    store = tmp_path / "m"
    proc = subprocess.run([tapml, "carve", "zoo:minilm", "-o", str(store)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bars or warnings when stderr is not a terminal
    proc = subprocess.run([tapml, "inspect", str(store), "--json"], capture_output=True, text=True)
    summary = json.loads(proc.stdout)
    assert proc.returncode == 0 and summary["ops"] >= 200 and summary["verified"] is True


def test_generate_and_replay_check(tmp_path, capsys):
    code, out, _ = run(["carve", "zoo:tiny-llama", "--generate", "3", "-o", str(tmp_path / "g"),
                        "--json", "--verify-replay"], capsys)
    summary = json.loads(out)
    assert code == 0 and [s["name"] for s in summary["steps"]] == ["prefill", "decode 1", "decode 2"]
    assert summary["replay"]["fidelity"] == 1.0
    code, _, err = run(["carve", "zoo:minilm", "--generate", "2", "-o", str(tmp_path / "x")], capsys)
    assert code == 2 and "no generate entry" in err


def test_help_lists_commands_in_workflow_order_uncut(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.startswith("  ")
              and not line.startswith("   ")]
    assert listed[:8] == ["zoo", "carve", "inspect", "offload", "report", "diff", "repro", "replay"]
    assert "..." not in out.split("Commands:")[1]


def test_one_error_style_for_pytest_usage_errors_too(tmp_path, factory_file, capsys):
    store = tmp_path / "s"
    assert main(["carve", f"{factory_file}:good", "-o", str(store)]) == 0
    capsys.readouterr()
    for args, message in ((["--tapml-rule", "xx"], "--rule 'xx': choose from"),
                          (["--platform", "nope"], "unknown platform 'nope'")):
        code = main(["test", str(store), *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("tapml: error: ") and message in err, err
        assert "ERROR" not in err and len(err.strip().splitlines()) == 1

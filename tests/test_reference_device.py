"""The reference device (``--reference-device``) and saved references (``offload --store``).

CUDA is absent here: the CPU path is tested end to end, the CUDA path's refusal, the device
rewriting a CUDA-carved store needs on the CPU, and the runner that moves a model (on ``meta``).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tapml
from tapml.cli import main
from tapml.core import OpCall, TapmlError
from tapml.devices import check_device, device_runner, move_to
from tapml.platforms import TorchPlatform
from tapml.settings import Settings
from tapml.workloads import load_workload

cuda_absent = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _mlp(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    return model, (torch.randn(16, 64),)


def _settings(platform: str = "torch-cpu") -> Settings:
    return Settings(platform=platform, in_process=True)


def test_the_cpu_reference_is_named_in_the_store_and_the_run(tmp_path, capsys):
    assert main(["carve", "zoo:tiny-llama", "--reference-device", "cpu", "-o", str(tmp_path / "s")]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["reference"] == {"name": "torch-cpu (eager)", "device": "cpu",
                                     "description": "PyTorch eager on this CPU"}
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "s"), "--json", "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["reference"]["device"] == "cpu"
    run = tapml.offload("zoo:tiny-llama", settings=_settings(), reference_device="cpu")
    assert run.reference.device == "cpu" and run.reference.saved is None


@cuda_absent
@pytest.mark.parametrize("command", ["carve", "offload"])
def test_a_cuda_reference_without_cuda_is_one_line_and_exit_2(tmp_path, capsys, command):
    extra = ["--platform", "torch-cpu"] if command == "offload" else []
    assert main([command, "zoo:tiny-llama", "--reference-device", "cuda", *extra, "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reference-device cuda: no CUDA device visible to PyTorch" in err
    assert not (tmp_path / "x").exists()


def test_a_device_that_is_not_cpu_or_cuda_is_refused():
    with pytest.raises(TapmlError, match="choose cpu, cuda or cuda:N"):
        check_device("tpu")
    assert check_device("cpu") == "cpu"


def test_the_runner_moves_the_model_and_what_the_model_makes_or_closes_over():
    """zoo:tiny-llama makes its mask and positions with torch.full/arange and its generate loop closes
    over a CPU prompt: all of it must end up on the reference device (``meta`` stands in for CUDA)."""
    w = load_workload("zoo:tiny-llama")
    w.inputs = move_to(w.inputs, "meta")
    run = device_runner(w.model, w.run, "meta")
    assert run(None).device.type == "meta"
    assert run(3).device.type == "meta" and run(3).shape == (1, 11)


def test_a_store_carved_on_cuda_replays_on_the_cpu():
    """Creation ops record their device: a CUDA carve's ``arange(device='cuda:0')`` runs on the CPU here."""
    op = OpCall.from_json({"op": "aten.arange.start", "args": [0, 4], "kwargs": {"dict": {
        "dtype": {"dtype": "float32"}, "device": {"device": "cuda:0"}, "pin_memory": False}},
        "outputs": {"tensor": {"dtype": "float32", "shape": [4], "stride": [1]}}})
    platform = TorchPlatform()
    (out,) = platform.run(platform.compile(op), op, [])
    assert out.device.type == "cpu" and out.tolist() == [0.0, 1.0, 2.0, 3.0]


class _Skew(TorchDispatchMode):
    """Another reference's rounding, emulated: every matrix product comes out 2^-20 larger."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
            out = out * (1 + 2 ** -20)
        return out


def test_a_saved_reference_judges_the_run_and_its_distance_from_the_live_one_is_reported():
    model, inputs = _mlp()
    with _Skew():  # below the tracer: the store holds the skewed outputs, as if carved on another device
        store = tapml.carve(model, inputs)
    run = tapml.offload(model, inputs, settings=_settings(), store=store)
    assert run.reference.saved == str(store.path) and run.reference.live == "torch-cpu (eager) on cpu"
    assert any("saved reference" in n for n in run.notes)
    (finding,) = [f for f in run.findings if f.kind == "reference-difference"]
    assert "differs from the saved one" in finding.message
    # the yardstick is the store's output: the run's end-to-end error is the skew, not zero
    assert run.end_to_end.max_abs > 0
    addmm = run.ops["aten.addmm*"][0]
    assert addmm.local.max_abs > 0 and addmm.status == "ok"  # within the float32 bound: a rounding difference


def test_a_saved_reference_from_the_same_device_changes_nothing():
    model, inputs = _mlp()
    store = tapml.carve(model, inputs)
    run = tapml.offload(model, inputs, settings=_settings(), store=store)
    assert run.verdict == "ok" and run.end_to_end.max_abs == 0
    assert not [f for f in run.findings if f.kind == "reference-difference"]


def test_a_run_that_does_not_repeat_the_saved_carve_is_refused():
    store = tapml.carve(*_mlp(seed=0))
    other, inputs = _mlp(seed=1)  # other weights: the store's outputs cannot stand for this model's
    with pytest.raises(TapmlError, match="does not repeat the carve"):
        tapml.offload(other, inputs, settings=_settings(), store=store)

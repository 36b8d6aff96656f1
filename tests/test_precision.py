"""Precision modes are findings: a target computing float32 matmuls in TF32 is named as such.

On the CPU a test platform emulates TF32 (contraction operands rounded to 10 mantissa bits, as tensor
cores take them), so the check runs for real here; ``torch-cuda`` / ``torch-cuda-tf32`` are the switch
on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tapml
from tapml.platforms import list_platforms, platform_class
from tapml.settings import Settings

TF32 = f"{Path(__file__).resolve().parent / 'helpers' / 'tf32_platform.py'}:EmulatedTF32"


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 16)).eval()
    return model, (torch.randn(32, 256),)


@pytest.fixture(scope="module")
def tf32_run():
    model, inputs = _mlp()
    return tapml.offload(model, inputs, settings=Settings(platform=TF32, in_process=True), plan="all")


def test_tf32_matmuls_are_out_of_the_float32_bound_and_named_tf32(tf32_run):
    addmms = tf32_run.ops["aten.addmm*"]
    assert addmms and all(o.status == "divergent" for o in addmms)
    for o in addmms:
        b = o.local.bound
        assert b.ratio > 1 and b.precision == "tf32"
        assert b.consistent_with.startswith("TF32 matmul: beyond the float32 bound (u = 2^-24) but within the TF32")
        assert "consistent with TF32 matmul" in o.local.why
    # what is not a contraction is untouched
    assert all(o.local.max_abs == 0 for o in tf32_run.ops["aten.gelu*"])


def test_the_run_has_one_precision_finding_naming_the_mode_and_the_switch(tf32_run):
    (finding,) = [f for f in tf32_run.findings if f.kind == "precision"]
    assert finding.message.startswith(f"{len(tf32_run.ops['aten.addmm*'])} out-of-bounds contractions are "
                                      "consistent with TF32")
    assert "allow_tf32" in finding.message and "torch-cuda-tf32" in finding.message


def test_float32_arithmetic_gets_no_precision_finding():
    model, inputs = _mlp()
    run = tapml.offload(model, inputs, settings=Settings(platform="torch-cpu", in_process=True), plan="all")
    assert run.verdict == "ok" and not [f for f in run.findings if f.kind == "precision"]


def test_a_bfloat16_accumulation_is_not_mistaken_for_tf32():
    """Errors far beyond TF32's bound: named by the operand rounding they match, never TF32."""
    run = tapml.replay(tapml.carve(*_mlp()), settings=Settings(platform="bf16", in_process=True))
    addmm = next(r for r in run.results if r.op == "aten.addmm.default")
    assert addmm.local.bound is None or addmm.local.bound.precision != "tf32"


def test_a_dropped_term_is_not_called_tf32_though_it_fits_tf32s_bound():
    run = tapml.replay(tapml.carve(*_mlp()), settings=Settings(platform=TF32.replace("EmulatedTF32", "DroppedTerm"),
                                                              in_process=True))
    addmm = [r for r in run.results if r.op == "aten.addmm.default"]
    assert addmm and all(r.status == "divergent" and r.local.bound.precision != "tf32" for r in addmm)


def test_torch_cuda_has_a_tf32_switch():
    off, on = platform_class("torch-cuda"), platform_class("torch-cuda-tf32")
    assert off.tf32 is False and on.tf32 is True and issubclass(on, off)
    names = {r["name"] for r in list_platforms()}
    assert {"torch-cuda", "torch-cuda-tf32"} <= names


@pytest.mark.parametrize("tf32", [False, True])
def test_torch_cuda_sets_its_precision_for_each_op_and_puts_it_back(tf32):
    from tapml.core import OpCall

    m = torch.backends.cuda.matmul
    flags = lambda: (m.allow_tf32, torch.backends.cudnn.allow_tf32, m.allow_fp16_reduced_precision_reduction)  # noqa: E731
    before, seen = flags(), []

    class OnCPU(platform_class("torch-cuda-tf32" if tf32 else "torch-cuda")):
        device = "cpu"  # the same switches, run here

    spec = {"tensor": {"dtype": "float32", "shape": [2, 2], "stride": [2, 1]}}
    op = OpCall.from_json({"op": "aten.mm.default", "args": [spec, spec], "kwargs": {"dict": {}}, "outputs": spec})
    (out,) = OnCPU().run(lambda *a: seen.append(flags()) or torch.mm(*a), op, [torch.eye(2), torch.eye(2)])
    assert seen == [(tf32, tf32, before[2] if tf32 else False)] and flags() == before
    assert torch.equal(out, torch.eye(2))

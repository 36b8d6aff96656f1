"""scripts/gpu-check as a CPU smoke run: the same script, torch-cpu for the GPU platforms, the CPU's SDPA backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "GPU_CHECK_PLATFORMS": "torch-cpu torch-cuda", "GPU_CHECK_WORKLOADS": "tiny-llama",
           "GPU_CHECK_DEVICE": "cpu"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["attention.json", "gpu-check.log", "results.tar.gz",
                                                     "summary.json", "summary.md"]
    rows = {(row["check"], row["run"]): row for row in json.loads((out / "summary.json").read_text())}
    assert rows[("replay", "tiny-llama-torch-cpu")]["verdict"] == "ok"
    assert rows[("offload", "tiny-llama-torch-cpu")]["verdict"] == "ok"
    if not torch.cuda.is_available():  # a platform this machine lacks: its row says why, the script goes on
        assert "no CUDA device" in rows[("offload", "tiny-llama-torch-cuda")]["note"]
    attention = json.loads((out / "attention.json").read_text())
    math_f32 = next(x for x in attention["rows"] if (x["backend"], x["dtype"]) == ("math", "float32"))
    assert math_f32["verdict"] == "pass" and math_f32["calls"] == 8  # 2 layers × (prefill + 3 decode steps)
    summary = (out / "summary.md").read_text()
    assert "| math | float32 | 8 | 0 |" in summary and "torch 2." in summary
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "./offload-tiny-llama-torch-cpu/run.json" in names or "offload-tiny-llama-torch-cpu/run.json" in names

"""The reference as an object: what the engine trusts and re-runs ops on.

Why a parameter, not a hard-wired ``TorchPlatform()``: the reference may be
PyTorch on another device (a CUDA carve) or, later, a saved golden; the engine
and the record take whatever is passed in.
"""

from __future__ import annotations

import torch

from tapml.platforms import LocalTarget, Target, TorchCUDA, TorchPlatform
from tapml.record import Reference as ReferenceRecord

__all__ = ["Reference", "torch_reference", "reference_info"]


class Reference:
    """A trusted platform: ``target`` re-runs single ops (noise, random inputs), ``record`` describes it."""

    def __init__(self, target: Target, *, name: str, device: str, description: str = ""):
        self.target = target
        self.record = ReferenceRecord(name=name, device=device, description=description)

    @property
    def name(self) -> str:
        return self.record.name


def torch_reference(device: str = "cpu") -> Reference:
    """PyTorch eager on ``device`` (``cpu`` or ``cuda[:N]``)."""
    platform = TorchCUDA() if device.startswith("cuda") else TorchPlatform()
    info = reference_info(device)
    return Reference(LocalTarget(platform), name=info["name"], device=device, description=info["description"])


def reference_info(device: str) -> dict[str, str]:
    """What a store's manifest and a run record say about the reference."""
    kind = device.split(":")[0]
    info = {"name": f"torch-{kind} (eager)", "device": device}
    if kind == "cuda":
        info["description"] = f"PyTorch eager on {torch.cuda.get_device_name(torch.device(device))}"
    else:
        info["description"] = "PyTorch eager on this CPU"
    return info

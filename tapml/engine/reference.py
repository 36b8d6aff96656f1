"""The reference as an object: what the engine trusts and re-runs ops on.

Why a parameter, not a hard-wired ``TorchPlatform()``: the reference may be
PyTorch on another device (a CUDA carve) or, later, a saved golden; the engine
and the record take whatever is passed in.
"""

from __future__ import annotations

from tapml.platforms import LocalTarget, Target, TorchCUDA, TorchPlatform
from tapml.record import Reference as ReferenceRecord

__all__ = ["Reference", "torch_reference"]


class Reference:
    """A trusted platform: ``target`` re-runs single ops (noise, random inputs), ``record`` describes it."""

    def __init__(self, target: Target, *, name: str, device: str, description: str = ""):
        self.target = target
        self.record = ReferenceRecord(name=name, device=device, description=description)

    @property
    def name(self) -> str:
        return self.record.name


def torch_reference(device: str = "cpu") -> Reference:
    """PyTorch eager on ``device`` (``cpu`` or ``cuda``)."""
    platform = TorchCUDA() if device.startswith("cuda") else TorchPlatform()
    return Reference(LocalTarget(platform), name=f"torch-{device.split(':')[0]} (eager)", device=device,
                     description="PyTorch eager: the model as it runs today")

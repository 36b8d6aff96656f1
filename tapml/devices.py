"""The reference device (``--reference-device cpu|cuda[:N]``): where the carve and the live reference runs happen.

Why more than ``model.to(device)``: an eager model makes tensors of its own (``torch.arange``,
a mask from ``torch.full``) and a generation loop closes over the prompt it was built with, all
on the CPU. Runs happen under ``torch.device(device)`` (factory functions land on the device) and a
function mode that moves a CPU operand of a mixed-device call to the device — with the dispatch
modes off, so the carve records the same ops on every device (a CUDA store lines up with a CPU run).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

from .core import TapmlError

__all__ = ["check_device", "device_runner", "move_to"]


def check_device(name: str) -> str:
    """``name`` as ``cpu`` or ``cuda:N``; a device this machine lacks is one ``TapmlError`` line."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", str(name))
    if m is None or (m.group(1) == "cpu" and m.group(2)):
        raise TapmlError(f"--reference-device {name!r}: choose cpu, cuda or cuda:N")
    if m.group(1) == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise TapmlError(f"--reference-device {name}: no CUDA device visible to PyTorch on this machine "
                         f"(torch {torch.__version__})")
    index = int(m.group(2) or 0)
    if index >= torch.cuda.device_count():
        raise TapmlError(f"--reference-device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return f"cuda:{index}"


def move_to(value: Any, device: str) -> Any:
    """Every tensor in ``value`` (a tuple, dict or tensor of inputs) on ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


class _Pull(TorchFunctionMode):
    """A call mixing CPU tensors (not scalars) with tensors on the device gets its CPU ones moved."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == self.device.type for t in flat) and \
                any(t.device.type == "cpu" and t.dim() for t in flat):
            with _disable_current_modes():  # not an op of the model: the carve must not record the copy
                args, kwargs = tree_map(self._pull, (args, kwargs))
        return func(*args, **kwargs)

    def _pull(self, t):
        return t.to(self.device) if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() else t


def device_runner(model: torch.nn.Module, run: Callable[[int | None], Any],
                  device: str) -> Callable[[int | None], Any]:
    """``run(generate)`` on ``device``: the model moved there once, each run under the device context."""
    if device == "cpu":
        return run
    model.to(device)
    target = torch.device(device)

    def on_device(generate: int | None = None) -> Any:
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        saved = matmul.allow_tf32, cudnn.allow_tf32
        matmul.allow_tf32 = cudnn.allow_tf32 = False  # the reference computes float32 in float32
        try:
            with target, _Pull(target):
                return run(generate)
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved

    return on_device

"""The floor a Python-level tracer pays: a forward under a ``TorchDispatchMode`` that records nothing."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class EmptyMode(TorchDispatchMode):
    """Every op passes through Python and is run as is."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def empty_mode() -> EmptyMode:
    return EmptyMode()

"""``WrappedPlatform``: another platform, by name, with its results open to alteration.

The fault-injection pattern: subclass, set ``inner``, override ``run`` (one op) or
``run_graph`` (a whole compiled unit) and change what ``super()`` returns
(``examples/faulty_gelu.py``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import torch

from tapml.core import OpCall, UnitCall

from .base import Capabilities, KernelTrace, Platform, Support
from .registry import get_platform, platform_class

__all__ = ["WrappedPlatform"]


class WrappedPlatform(Platform):
    """Delegates ``supports``/``compile``/``run`` to the platform named ``inner``."""

    inner: ClassVar[str] = "torch-cpu"

    def __init__(self) -> None:
        super().__init__()
        self.wrapped = get_platform(self.inner)

    @classmethod
    def availability(cls) -> Support:
        return platform_class(cls.inner).availability()

    def capabilities(self) -> Capabilities:
        return self.wrapped.capabilities()

    def supports(self, op: OpCall) -> Support:
        return self.wrapped.supports(op)

    def compile(self, op: OpCall) -> Any:
        return self.wrapped.compile(op)

    def run(self, kernel: Any, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.wrapped.run(kernel, op, inputs)

    def compile_graph(self, unit: UnitCall) -> Any:
        return self.wrapped.compile_graph(unit)

    def run_graph(self, kernel: Any, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.wrapped.run_graph(kernel, unit, inputs)

    def trace_graph(self, kernel: Any, unit: UnitCall, inputs: list[torch.Tensor]) -> KernelTrace:
        return self.wrapped.trace_graph(kernel, unit, inputs)

    def counters(self) -> Counter:
        return super().counters() + self.wrapped.counters()

    def close(self) -> None:
        self.wrapped.close()

"""The ``Platform`` interface: what a target supports, compiling an op, running a kernel.

Why this shape (after Polygraphy's runners): a platform is three small methods
— ``supports``, ``compile``, ``run`` — and everything the engine needs on top
(compile once per signature, remember refusals, count compiles) is provided
here, so a new target or a fault-injecting wrapper is a few lines.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from .opcall import OpCall

__all__ = ["Platform", "WrappedPlatform", "Capabilities", "Support", "Unsupported", "PlatformError"]


class PlatformError(Exception):
    """A platform that cannot be found, loaded or started; the message says which and why."""


class Unsupported(Exception):
    """Raised by ``compile``/``run`` when the target cannot run this op; the reason is one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Support:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    @classmethod
    def yes(cls) -> Support:
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> Support:
        return cls(False, reason)


ALL_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


@dataclass(frozen=True)
class Capabilities:
    """What a target computes; the engine picks tolerances from ``compute_dtype``."""

    device: str = "cpu"
    dtypes: tuple[str, ...] = ALL_DTYPES
    compute_dtype: str | None = None  # float ops computed in this dtype (None: in their own)
    int64: bool = True
    float64: bool = True
    max_buffer_bytes: int | None = None
    limits: tuple[tuple[str, int], ...] = ()  # other named limits, for display

    def to_json(self) -> dict:
        return asdict(self)


class Platform:
    """Subclass and set ``name``; override ``run`` (and ``compile``/``supports`` if needed)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    runs_views: ClassVar[bool] = False  # view/metadata ops stay on the reference unless claimed

    def __init__(self) -> None:
        self._kernels: dict[str, Any] = {}
        self._support: dict[str, Support] = {}
        self.stats: Counter = Counter()

    # -- what a platform implements ------------------------------------------------
    @classmethod
    def availability(cls) -> Support:
        """Whether this platform can run on this machine at all, and why not."""
        return Support.yes()

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def supports(self, op: OpCall) -> Support:
        """A static check before compiling; the default applies the capabilities."""
        if op.view and not self.runs_views:
            return Support.no("view op (no compute): stays on the reference")
        if not op.tensor_outputs_only:
            return Support.no("returns a Python value, not tensors: stays on the reference")
        caps = self.capabilities()
        for spec in op.inputs + op.output_specs:
            if spec.dtype not in caps.dtypes:
                return Support.no(f"dtype {spec.dtype} is not supported on {self.name}")
            if caps.max_buffer_bytes is not None and spec.nbytes > caps.max_buffer_bytes:
                return Support.no(f"a {spec.nbytes}-byte tensor exceeds max buffer size {caps.max_buffer_bytes}")
        return Support.yes()

    def compile(self, op: OpCall) -> Any:
        """Turn an op into a kernel (raise ``Unsupported`` to refuse). Called once per signature."""
        return None

    def run(self, kernel: Any, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run a kernel on tensors laid out as ``op.inputs``; return ``op.output_specs``' tensors."""
        raise NotImplementedError

    def close(self) -> None:
        """Release devices, processes or sockets."""

    # -- what the engine calls -----------------------------------------------------
    def prepare(self, op: OpCall) -> Support:
        """Check and compile once per signature; refusals are remembered too."""
        known = self._support.get(op.signature)
        if known is not None:
            self.stats["cache_hits"] += 1
            return known
        support = self.supports(op)
        if support:
            try:
                self._kernels[op.signature] = self.compile(op)
                self.stats["compiles"] += 1
            except Unsupported as e:
                support = Support.no(e.reason)
        self._support[op.signature] = support
        return support

    def execute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run one call; raises ``Unsupported`` when the target cannot."""
        support = self.prepare(op)
        if not support:
            raise Unsupported(support.reason)
        outputs = self.run(self._kernels[op.signature], op, inputs)
        self.stats["runs"] += 1
        return outputs

    def describe(self) -> dict:
        available = self.availability()
        return {"name": self.name, "description": self.description, "available": available.ok,
                "reason": available.reason, "capabilities": self.capabilities().to_json()}


class WrappedPlatform(Platform):
    """A platform that delegates to another by name: override ``run`` to alter what it returns."""

    inner: ClassVar[str] = "torch-cpu"

    def __init__(self) -> None:
        super().__init__()
        from .registry import get_platform

        self.wrapped = get_platform(self.inner)

    @classmethod
    def availability(cls) -> Support:
        from .registry import platform_class

        return platform_class(cls.inner).availability()

    def capabilities(self) -> Capabilities:
        return self.wrapped.capabilities()

    def supports(self, op: OpCall) -> Support:
        return self.wrapped.prepare(op)

    def run(self, kernel: Any, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.wrapped.execute(op, inputs)

    def close(self) -> None:
        self.wrapped.close()

"""The ``Platform`` interface for plugin authors: what a target supports, compiling an op, running a kernel.

Why this shape (after Polygraphy's runners): a platform is three small methods
— ``supports``, ``compile``, ``run`` — and nothing else. What the engine needs
on top (compile once per signature, remember refusals, count) is the separate
engine-facing ``Target`` interface (``target.py``), which a local platform gets
by wrapping and a remote worker implements over RPC.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from tapml.core import OpCall, TapmlError, UnitCall

__all__ = ["Platform", "Capabilities", "Support", "Unsupported", "PlatformError", "ALL_DTYPES", "KernelTrace"]


class PlatformError(TapmlError):
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


# what a compiled unit launched: each kernel's name and the tensors it wrote, in order
KernelTrace = list[tuple[str, list[torch.Tensor]]]

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

    @classmethod
    def from_json(cls, obj: dict) -> Capabilities:
        caps = dict(obj)
        caps["dtypes"] = tuple(caps.get("dtypes", ALL_DTYPES))
        caps["limits"] = tuple(tuple(x) for x in caps.get("limits", ()))
        return cls(**{k: v for k, v in caps.items() if k in cls.__dataclass_fields__})


class Platform:
    """Subclass and set ``name``; override ``run`` (and ``compile``/``supports`` if needed)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    runs_views: ClassVar[bool] = False  # view/metadata ops stay on the reference unless claimed

    def __init__(self) -> None:
        self.stats: Counter = Counter()  # the platform's own counters (builds, disk hits, ...)

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

    def runner(self, kernel: Any, op: OpCall) -> Callable[[OpCall, list[torch.Tensor]], list[torch.Tensor]]:
        """``run`` for every call of ``op``'s signature, with what does not change between its calls worked
        out once (a worker's binary op-run path calls it with the op at each call's place). Optional: the
        default is ``run`` itself."""
        return lambda placed, inputs: self.run(kernel, placed, inputs)

    # graph level: a whole module call (``UnitCall``) compiled as one unit — optional

    def compile_graph(self, unit: UnitCall) -> Any:
        """Compile a unit (a module call's carved ops, wired by data flow) as one program; raise
        ``Unsupported`` with the reason when it cannot (the engine then descends to the children)."""
        raise Unsupported(f"{self.name} compiles single ops, not whole modules")

    def run_graph(self, kernel: Any, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run a compiled unit on tensors laid out as ``unit.input_specs``; return its outputs."""
        raise Unsupported(f"{self.name} compiles single ops, not whole modules")

    def trace_graph(self, kernel: Any, unit: UnitCall, inputs: list[torch.Tensor]) -> KernelTrace:
        """Each kernel the compiled unit launches, in order, with the tensors it wrote: ``[(name, outputs)]``.
        Optional: what lets localization name the fused kernel inside a unit."""
        raise Unsupported(f"{self.name} does not expose the kernels inside a compiled unit")

    def counters(self) -> Counter:
        """The platform's own counters, for the engine's statistics."""
        return Counter(self.stats)

    def close(self) -> None:
        """Release devices, processes or sockets."""

    def describe(self) -> dict:
        available = self.availability()
        return {"name": self.name, "description": self.description, "available": available.ok,
                "reason": available.reason, "capabilities": self.capabilities().to_json()}

"""The engine-facing interface: ``Target`` (``prepare``/``execute``/``stats``) and ``LocalTarget``.

Why separate from ``Platform``: plugin authors write three small methods; the
engine needs compile-once caching, remembered refusals and counters, and must
not tell an in-process platform from a worker across the network. Both
``LocalTarget`` (wrapping a ``Platform``) and the remote proxy implement this.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from tapml.core import OpCall, OpFailed, UnitCall

from .base import Capabilities, KernelTrace, Platform, Support, Unsupported

__all__ = ["Target", "LocalTarget", "TargetWrapper"]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _kernel_failed(e: BaseException) -> OpFailed:
    return OpFailed(f"the kernel raised {_one_line(e)}")


def _in_fresh_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread of its own. A live mixed run compiles from inside torch's dispatcher, whose
    thread-local state (autograd keys excluded below the dispatch mode) makes ``torch.export`` fail
    ("a fake tensor in the exported program constant's list"); a new thread starts from clean state."""
    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    worker = threading.Thread(target=go, name="tapml-compile")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class Target:
    """What the engine calls. ``execute`` raises ``Unsupported`` or ``tapml.core.OpFailed``."""

    name: str = ""
    description: str = ""
    lost: str | None = None  # why the target is gone for the rest of the run (a worker that cannot be reached)
    events: list[dict] = []  # crashes and restarts of the process behind it, in order (overridden per instance)

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def prepare(self, op: OpCall) -> Support:
        """Check and compile once per signature; refusals are remembered too."""
        raise NotImplementedError

    def execute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _unit_support(self, unit: UnitCall, build: Callable[[], Support]) -> Support:
        """Whether ``unit`` runs here, built once per unit signature (``build``) and remembered, refusals too;
        for targets that keep ``_support`` and ``_stats``."""
        key = "unit:" + unit.signature
        known = self._support.get(key)
        if known is not None:
            self._stats["unit_cache_hits"] += 1
            return known
        support = self._support[key] = build()
        return support

    def runner(self, op: OpCall) -> Callable[[OpCall, list[torch.Tensor]], list[torch.Tensor]] | None:
        """``execute`` for every call of ``op``'s signature (called with the op at each call's place), bound
        once; None when the target refuses the op. The default is ``execute`` itself."""
        return (lambda placed, inputs: self.execute(placed, inputs)) if self.prepare(op) else None

    def prepare_unit(self, unit: UnitCall) -> Support:
        """Compile a whole unit once per signature; ``Support.no(reason)`` when the target cannot."""
        return Support.no(f"{self.name} does not compile whole modules")

    # pipelined runs (``pipelines``): a target across a socket takes a run before answering the last
    pipelines: bool = False
    # the inputs of ``execute`` are read into another process (a socket): this process's tensors are never
    # written or kept, so the caller may pass memory that must not change (a live model's weight)
    copies_inputs: bool = False

    def send_run(self, op: OpCall, inputs: list[torch.Tensor], named: Callable[[torch.Tensor], str | None]
                 ) -> list[str] | None:
        """Send a run of prepared ``op`` without waiting; inputs ``named`` are outputs still on their way.
        Returns its outputs' names, or None when nothing was sent (answer what is in flight first)."""
        return None

    def send_unit(self, unit: UnitCall, inputs: list[torch.Tensor], named: Callable[[torch.Tensor], str | None]
                  ) -> list[str] | None:
        """``send_run`` for a prepared unit; its answer comes through ``receive_run`` in turn."""
        return None

    def receive_run(self, into: list | None = None
                    ) -> tuple[list[torch.Tensor] | None, OpFailed | Unsupported | None, float]:
        """The oldest run in flight's answer: ``(outputs, None, kernel seconds)``, ``(None, error, 0)``, or
        ``(None, None, 0)`` when no answer will come (run it again). ``into``: tensors (or None) the outputs
        may be received in, in place (the placeholders: no second copy)."""
        raise NotImplementedError(f"{self.name} does not pipeline runs")

    def answer_ready(self) -> bool:
        """Whether the oldest run in flight's answer has (begun to) come: reading it will not wait long."""
        return False

    def adopt(self, live: torch.Tensor, received: torch.Tensor) -> None:
        """``live`` was filled with ``received``'s values (for targets that cache what they hold)."""

    def content_key(self, output: torch.Tensor) -> str | None:
        """The content key of ``output``, an output this target returned, when the target knows it without
        hashing (a worker hashes the bytes it sends), else None. Why: an output whose key is the carved one
        holds the carved bytes, and the judge need not read the carve to compare them."""
        return None

    def execute_unit(self, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise Unsupported(f"{self.name} does not compile whole modules")

    def trace_unit(self, unit: UnitCall, inputs: list[torch.Tensor]) -> KernelTrace:
        """The kernels a compiled unit launched, with their outputs (``Platform.trace_graph``)."""
        raise Unsupported(f"{self.name} does not expose the kernels inside a compiled unit")

    @property
    def stats(self) -> Counter:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TargetWrapper(Target):
    """A target seen through another (quarantine, compile timing): every call and attribute is the wrapped
    target's unless a subclass changes it (``runner`` excepted: the base one calls this wrapper's
    ``prepare`` and ``execute``, so what the wrapper adds applies to it). Why explicit: ``Target``
    defines defaults as class attributes (``pipelines``, ``send_run``, ...), which ``__getattr__`` alone
    would never reach — a wrapper that forgot one silently turned the wrapped target's pipelining off."""

    def __init__(self, target: Target):
        self.target = target

    def __getattr__(self, name: str) -> Any:  # address, ...: the wrapped target's
        if name == "target":  # not set yet (unpickling, a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self.target, name)

    @property
    def name(self) -> str:  # a remote target renames itself when its worker is replaced
        return self.target.name

    @property
    def description(self) -> str:
        return self.target.description

    @property
    def lost(self) -> str | None:
        return self.target.lost

    @property
    def events(self) -> list[dict]:
        return self.target.events

    @property
    def stats(self) -> Counter:
        return self.target.stats

    @property
    def pipelines(self) -> bool:
        return self.target.pipelines

    @property
    def copies_inputs(self) -> bool:
        return self.target.copies_inputs

    def capabilities(self) -> Capabilities:
        return self.target.capabilities()

    def prepare(self, op: OpCall) -> Support:
        return self.target.prepare(op)

    def execute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.target.execute(op, inputs)

    def prepare_unit(self, unit: UnitCall) -> Support:
        return self.target.prepare_unit(unit)

    def execute_unit(self, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.target.execute_unit(unit, inputs)

    def trace_unit(self, unit: UnitCall, inputs: list[torch.Tensor]) -> KernelTrace:
        return self.target.trace_unit(unit, inputs)

    def send_run(self, op: OpCall, inputs: list[torch.Tensor], named: Callable[[torch.Tensor], str | None]
                 ) -> list[str] | None:
        return self.target.send_run(op, inputs, named)

    def send_unit(self, unit: UnitCall, inputs: list[torch.Tensor], named: Callable[[torch.Tensor], str | None]
                  ) -> list[str] | None:
        return self.target.send_unit(unit, inputs, named)

    def receive_run(self, into: list | None = None
                    ) -> tuple[list[torch.Tensor] | None, OpFailed | Unsupported | None, float]:
        return self.target.receive_run(into)

    def answer_ready(self) -> bool:
        return self.target.answer_ready()

    def adopt(self, live: torch.Tensor, received: torch.Tensor) -> None:
        self.target.adopt(live, received)

    def content_key(self, output: torch.Tensor) -> str | None:
        return self.target.content_key(output)

    def describe(self) -> dict:
        return self.target.describe()

    def close(self) -> None:
        self.target.close()


class LocalTarget(Target):
    """A ``Platform`` in this process, compiled once per op signature."""

    def __init__(self, platform: Platform):
        self.platform = platform
        self.name, self.description = platform.name, platform.description
        self._kernels: dict[str, Any] = {}
        self._support: dict[str, Support] = {}
        self._stats: Counter = Counter()

    def capabilities(self) -> Capabilities:
        return self.platform.capabilities()

    def prepare(self, op: OpCall) -> Support:
        known = self._support.get(op.signature)
        if known is not None:
            self._stats["cache_hits"] += 1
            return known
        support = self.platform.supports(op)
        if support:
            try:
                self._kernels[op.signature] = _in_fresh_thread(lambda: self.platform.compile(op))
                self._stats["compiles"] += 1
            except Unsupported as e:
                support = Support.no(e.reason)
            except Exception as e:  # a compiler that crashes on one op costs that op
                raise OpFailed(f"compiling {op.op} raised {_one_line(e)}") from e
        self._support[op.signature] = support
        return support

    def execute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        support = self.prepare(op)
        if not support:
            raise Unsupported(support.reason)
        return self._ran(lambda: self.platform.run(self._kernels[op.signature], op, inputs))

    def runner(self, op: OpCall) -> Callable[[OpCall, list[torch.Tensor]], list[torch.Tensor]] | None:
        if not self.prepare(op):
            return None
        run = self.platform.runner(self._kernels[op.signature], op)

        def execute(placed: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            try:
                outputs = run(placed, inputs)
            except (Unsupported, OpFailed):
                raise
            except Exception as e:
                raise _kernel_failed(e) from e
            self._stats["runs"] += 1
            return outputs

        return execute

    def _ran(self, kernel: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        try:
            outputs = kernel()
        except (Unsupported, OpFailed):
            raise
        except Exception as e:  # the kernel failed: the op is lost, not the run
            raise _kernel_failed(e) from e
        self._stats["runs"] += 1
        return outputs

    def prepare_unit(self, unit: UnitCall) -> Support:
        return self._unit_support(unit, lambda: self._compile_unit(unit))

    def _compile_unit(self, unit: UnitCall) -> Support:
        try:
            self._kernels["unit:" + unit.signature] = _in_fresh_thread(lambda: self.platform.compile_graph(unit))
        except Unsupported as e:
            return Support.no(e.reason)
        except Exception as e:  # a compiler that crashes on a unit: the engine descends into its children
            return Support.no(f"compiling the unit raised {_one_line(e)}")
        self._stats["unit_compiles"] += 1
        return Support.yes()

    def _unit_kernel(self, unit: UnitCall) -> Any:
        support = self.prepare_unit(unit)
        if not support:
            raise Unsupported(support.reason)
        return self._kernels["unit:" + unit.signature]

    def execute_unit(self, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        kernel = self._unit_kernel(unit)
        try:
            outputs = self.platform.run_graph(kernel, unit, inputs)
        except (Unsupported, OpFailed):
            raise
        except Exception as e:
            raise OpFailed(f"the compiled unit raised {_one_line(e)}") from e
        self._stats["unit_runs"] += 1
        return outputs

    def trace_unit(self, unit: UnitCall, inputs: list[torch.Tensor]) -> KernelTrace:
        kernel = self._unit_kernel(unit)
        try:
            return self.platform.trace_graph(kernel, unit, inputs)
        except (Unsupported, OpFailed):
            raise
        except Exception as e:
            raise OpFailed(f"tracing the compiled unit raised {_one_line(e)}") from e

    @property
    def stats(self) -> Counter:
        return self._stats + self.platform.counters()

    def describe(self) -> dict:
        return self.platform.describe()

    def close(self) -> None:
        self.platform.close()

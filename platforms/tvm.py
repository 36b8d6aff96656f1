"""``tvm-llvm``: each op compiled by Apache TVM for this CPU and run on the Relax VM.

The op is wrapped in a one-op module, exported with ``torch.export``, imported
with TVM's own ``from_exported_program`` and built with ``tvm.compile``. Kernels
are cached in memory and on disk (``TAPML_CACHE_DIR``, default
``~/.cache/tapml``) keyed by platform, target, TVM and torch versions and the op
signature, so a model compiles once per unique signature and a rerun compiles
nothing. An op TVM cannot import or build is ``unsupported`` with TVM's reason.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch

from tapml.core import OpCall, OpRefused, UnitCall, bind_args, flatten_outputs, resolve_op

from .base import Capabilities, KernelTrace, Platform, Support, Unsupported
from .program import UnitProgram

__all__ = ["TVMPlatform", "TVMLLVM", "cache_dir"]


def cache_dir() -> Path:
    return Path(os.environ.get("TAPML_CACHE_DIR") or Path.home() / ".cache" / "tapml")


def _functional(op: OpCall):
    """The overload to export: in-place ``add_`` becomes ``add`` (export cannot keep the mutation)."""
    namespace, name, overload = op.op.split(".")
    if "out" in (op.kwargs.get("dict", {}) if isinstance(op.kwargs, dict) else {}):
        raise Unsupported("out= variant: no functional form to compile")
    if op.inplace and name.endswith("_"):
        try:
            return resolve_op(f"{namespace}.{name[:-1]}.{overload}")
        except OpRefused:
            raise Unsupported(f"in-place {op.op} has no functional variant") from None
    return op.func


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _import(module: torch.nn.Module, examples: tuple, export_failed: str):
    """``module`` exported with ``torch.export`` and imported by TVM's frontend; ``Unsupported`` naming
    the stage that refused it."""
    from tvm.relax.frontend.torch import from_exported_program

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exported = torch.export.export(module, examples)
        except Exception as e:
            raise Unsupported(f"{export_failed}: {_one_line(e)}") from None
        try:
            return from_exported_program(exported)
        except Exception as e:
            raise Unsupported(f"TVM frontend: {_one_line(e)}") from None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """TVM's DLPack import requires 64-byte aligned data; a view at an offset is not."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


_SCHEDULE = "loop-order-1"  # in the unit cache key: a change of schedule rebuilds


def _loop_order(func):
    """``func`` rescheduled for a CPU, or None. Per block: every reduction loop moves outside the
    innermost spatial loop (``C[i, j] += A[i, k] * B[k, j]`` walks ``j`` contiguously, which LLVM
    vectorizes, instead of striding through ``B`` along ``k``), and the spatial loops outside it run
    in parallel. Each output element still accumulates its ``k`` terms in order: the same bits.
    Unscheduled, a legalized matmul runs about 10× slower (MiniLM's layer: ~250 → ~25 ms)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    blocks = normalize_prim_func(sch)
    if not blocks:
        return None
    for block in blocks:
        kinds = "".join(i.kind for i in block.iters)
        if "O" in kinds:
            return None
        spatial = [i.loop_rv for i in block.iters if i.kind == "S"]
        reduce = [i.loop_rv for i in block.iters if i.kind == "R"]
        if reduce and spatial and kinds.endswith("R"):
            sch.reorder(*spatial[:-1], *reduce, spatial[-1])
        if len(spatial) >= 2:
            sch.parallel(sch.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0])
        if reduce and spatial and kinds.endswith("R"):
            sch.decompose_reduction(block.block_rv, reduce[0])
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


class _OneOp(torch.nn.Module):
    def __init__(self, fn, op: OpCall):
        super().__init__()
        self.fn, self.op = fn, op

    def forward(self, *tensors):
        args, kwargs = bind_args(self.op, list(tensors))
        return tuple(flatten_outputs(self.fn(*args, **kwargs)))


class TVMPlatform(Platform):
    """Base for TVM targets; subclasses set ``target`` and the device."""

    target: ClassVar[str] = "llvm"

    def __init__(self) -> None:
        super().__init__()
        import tvm

        self._tvm = tvm
        self.dev = tvm.cpu()

    @classmethod
    def availability(cls) -> Support:
        try:
            import tvm  # noqa: F401
            from tvm.relax.frontend.torch import from_exported_program  # noqa: F401
        except ImportError as e:
            return Support.no(f"apache-tvm is not importable: {e}")
        return Support.yes()

    def capabilities(self) -> Capabilities:
        return Capabilities(device=f"{self.target} (TVM {self._tvm.__version__})")

    def cache_key(self, op: OpCall) -> str:
        parts = [self.name, self.target, self._tvm.__version__, torch.__version__, op.op, op.signature]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]

    def compile(self, op: OpCall) -> Any:
        return self._cached(self.cache_key(op), lambda: self._build(op))

    def _cached(self, key: str, build) -> Any:
        """A VM for ``key`` from the disk cache, or built (and stored) now."""
        from tvm import relax

        path = cache_dir() / "tvm" / f"{key}.so"
        if path.exists():
            try:
                self.stats["disk_hits"] += 1
                return relax.VirtualMachine(self._tvm.runtime.load_module(str(path)), self.dev)
            except Exception:
                path.unlink(missing_ok=True)  # a stale or partial file: rebuild it
        executable = build()
        self.stats["builds"] += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.so")
        executable.export_library(str(tmp))
        os.replace(tmp, path)
        return relax.VirtualMachine(executable, self.dev)

    def _build(self, op: OpCall):
        mod = self.import_op(op)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return self._tvm.compile(mod, target=self.target)
            except Exception as e:
                raise Unsupported(f"TVM build: {_one_line(e)}") from None

    @staticmethod
    def import_op(op: OpCall, *, narrow_int64: bool = False):
        """The op as a Relax IRModule: a one-op module, ``torch.export``, TVM's frontend.

        ``narrow_int64`` exports int64 inputs as int32 (for targets without 64-bit integers)."""
        fn = _functional(op)
        examples = tuple(torch.zeros(s.shape, dtype=torch.int32 if narrow_int64 and s.dtype == "int64"
                                     else s.torch_dtype) for s in op.inputs)
        return _import(_OneOp(fn, op), examples, "torch.export failed")

    # graph level: the unit exported whole, fused by Relax, one VM per unit signature

    def compile_graph(self, unit: UnitCall) -> Any:
        parts = [self.name, self.target, self._tvm.__version__, torch.__version__, "unit", _SCHEDULE, unit.signature]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
        return self._cached(key, lambda: self._build_unit(unit))

    def _build_unit(self, unit: UnitCall):
        mod = self.schedule(self.fuse(self.import_unit(unit)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return self._tvm.compile(mod, target=self.target)
            except Exception as e:
                raise Unsupported(f"TVM build of the fused unit: {_one_line(e)}") from None

    @staticmethod
    def import_unit(unit: UnitCall):
        """The unit as a Relax IRModule: its program exported whole (``torch.export``), TVM's frontend."""
        examples = tuple(torch.zeros(s.shape, dtype=s.torch_dtype) for s in unit.input_specs)
        return _import(UnitProgram(unit), examples, "torch.export of the unit failed")

    def fuse(self, mod):
        """Relax's fusion passes (``tvm.compile``'s default pipeline legalizes but does not fuse)."""
        from tvm import relax

        passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                  relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return self._tvm.transform.Sequential(passes)(mod)
            except Exception as e:
                raise Unsupported(f"TVM fusion: {_one_line(e)}") from None

    def schedule(self, mod):
        """Each fused kernel's loops in a CPU-friendly order (``_loop_order``); a kernel the rule does
        not fit stays as legalized. Same arithmetic in the same order per element: bit-identical."""
        if self._tvm.target.Target(self.target).kind.name != "llvm":
            return mod
        tirx = self._tvm.tirx
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tir.is_scheduled", False):
                try:
                    scheduled = _loop_order(func)
                except Exception:  # a kernel the rule cannot reorder: left as it is
                    scheduled = None
                if scheduled is not None:
                    mod[gv] = scheduled
        return mod

    def _args(self, inputs: list[torch.Tensor]) -> list:
        return [self._tvm.runtime.empty(tuple(t.shape), str(t.dtype).removeprefix("torch."), self.dev)
                if t.numel() == 0 else self._tvm.runtime.from_dlpack(_aligned(t)) for t in inputs]

    def run_graph(self, kernel: Any, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        result = kernel["main"](*self._args(inputs))
        results = list(result) if not hasattr(result, "shape") else [result]
        return [torch.from_dlpack(r).clone() for r in results]

    def trace_graph(self, kernel: Any, unit: UnitCall, inputs: list[torch.Tensor]) -> KernelTrace:
        """Every fused kernel the unit's VM launches, with copies of the buffers it wrote (the last
        arguments of a destination-passing ``call_tir``; counts from the fused module's ``main``)."""
        writes = self.kernel_outputs(self.fuse(self.import_unit(unit)))
        trace: KernelTrace = []

        def instrument(func, symbol, before_run, ret, *args):
            n = writes.get(symbol)
            if not before_run and n:
                trace.append((symbol, [torch.from_dlpack(a).clone() for a in args[-n:]]))
            return 0

        kernel.set_instrument(instrument)
        try:
            kernel["main"](*self._args(inputs))
        finally:
            kernel.set_instrument(lambda *a: 0)
        return trace

    def kernel_outputs(self, mod) -> dict[str, int]:
        """How many output buffers each kernel that ``main`` calls (``call_tir``) writes."""
        from tvm import relax

        call_tir = self._tvm.ir.Op.get("relax.call_tir")
        counts = {}
        for block in mod["main"].body.blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.Call) and value.op.same_as(call_tir):
                    out = value.ty_args[0]
                    counts[value.args[0].name_hint] = len(out.fields) if hasattr(out, "fields") else 1
        return counts

    def run(self, kernel: Any, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # an empty tensor is allocated by TVM itself: its DLPack strides for zero-size dims do not match TVM's
        args = [self._tvm.runtime.empty(tuple(t.shape), str(t.dtype).removeprefix("torch."), self.dev)
                if t.numel() == 0 else self._tvm.runtime.from_dlpack(_aligned(t)) for t in inputs]
        result = kernel["main"](*args)
        results = list(result) if not hasattr(result, "shape") else [result]
        # returned as TVM computed them: a wrong shape or dtype is the comparison's finding, not an error
        return [torch.from_dlpack(r).clone() for r in results]


class TVMLLVM(TVMPlatform):
    name = "tvm-llvm"
    description = "Apache TVM, compiled per op for this CPU (LLVM), run on the Relax VM"
    target = "llvm"

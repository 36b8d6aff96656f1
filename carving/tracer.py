"""The carving tracer: every aten call and every module call of one eager run.

Why a dispatch mode and module hooks rather than ``torch.export``: carving must
work on any eager model — data-dependent control flow, cache objects, generate
loops — and the dispatch mode sees exactly the kernels that ran.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import hashlib
import itertools
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import keystr, tree_flatten_with_path

from tapml.core import (
    ALLOWED_NAMESPACES,
    TapmlError,
    bump_undeclared,
    dtype_name,
    encode,
    library_of,
    op_info,
    tensors_in,
)

from .dataflow import DataFlow
from .store import StoreError, StoreWriter, UncarvableTensor

__all__ = ["CarveOptions", "CarveError", "Tracer", "step", "signature"]

_INTERNAL_DIRS = tuple(
    os.path.dirname(m.__file__) + os.sep for m in (torch, contextlib, sys.modules[__package__])
)

_step_counter = itertools.count(1)
_current_step: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar("tapml_step", default=None)


@contextlib.contextmanager
def step(name: str):
    """Mark the calls inside as one named step (e.g. ``prefill``, ``decode 3``)."""
    token = _current_step.set((next(_step_counter), name))
    try:
        yield
    finally:
        _current_step.reset(token)


@dataclass
class CarveOptions:
    """What to record. Patterns: ``modules`` is a regex searched in the module path,
    ``ops`` are globs on the overload name (``aten.addmm*``)."""

    modules: str | None = None
    ops: tuple[str, ...] = ()
    unique: bool = False  # keep only the first call of each signature
    max_bytes: int | None = None  # stop recording once this many unique bytes are stored

    def to_json(self) -> dict:
        return {"modules": self.modules, "ops": list(self.ops), "unique": self.unique, "max_bytes": self.max_bytes}


def _meta(value):
    """A repr-stable stand-in for a value: tensors become (dtype, shape, stride)."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:  # sparse tensors have no strides (and are refused when stored)
            return (dtype_name(value.dtype), tuple(value.shape), str(value.layout))
        return (dtype_name(value.dtype), tuple(value.shape), value.stride())
    if isinstance(value, (list, tuple)):
        return tuple(_meta(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _meta(v)) for k, v in value.items())
    return value


def signature(name: str, args, kwargs) -> str:
    """Op identity for compile caches and de-duplication: overload, tensor metadata, other args."""
    return hashlib.sha1(repr((name, _meta(args), _meta(kwargs))).encode()).hexdigest()[:16]


@dataclass
class _Frame:
    layer: int | None  # index into layers, None when the module is filtered out
    path: str
    call: int


class Tracer(TorchDispatchMode):
    """Records into a ``StoreWriter``; use as ``with Tracer(writer, model): run()``."""

    def __init__(
        self,
        writer: StoreWriter,
        model: torch.nn.Module,
        options: CarveOptions | None = None,
        on_op: Callable[[int], None] | None = None,
    ):
        super().__init__()
        self.writer, self.model = writer, model
        self.options = options or CarveOptions()
        self.on_op = on_op
        self.ops: list[dict] = []
        self.layers: list[dict] = []
        self.steps: list[dict] = []
        self.truncated: str | None = None
        self._names = {}
        for name, mod in self.model.named_modules():
            self._names.setdefault(mod, name)
        self._module_re = re.compile(self.options.modules) if self.options.modules else None
        self._calls: dict[str, int] = {}
        self._stack: list[_Frame] = []
        self._seen_sigs: set[str] = set()
        self._step_token: tuple[int, str] | None = None
        self._busy = False
        self._handles = []
        self._internal: dict[str, bool] = {}
        self._seq = 0
        self._root_calls = 0
        self.dataflow = DataFlow()

    # -- lifecycle ----------------------------------------------------------------
    def __enter__(self):
        for mod in self._names:
            self._handles.append(mod.register_forward_pre_hook(self._enter_module, with_kwargs=True))
            self._handles.append(
                mod.register_forward_hook(self._exit_module, with_kwargs=True, always_call=True)
            )
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._close_step()
        return super().__exit__(*exc)

    # -- steps --------------------------------------------------------------------
    def _open_step(self, name: str) -> None:
        self._close_step()
        self.steps.append({"index": len(self.steps), "name": name, "ops": [len(self.ops), len(self.ops)]})

    def _close_step(self) -> None:
        if self.steps:
            self.steps[-1]["ops"][1] = len(self.ops)

    def _sync_step(self, root_call: bool) -> None:
        token = _current_step.get()
        if token is not None:
            if token != self._step_token:
                self._step_token = token
                self._open_step(token[1])
        elif root_call or not self.steps:
            self._step_token = None
            self._open_step(f"call {self._root_calls}" if root_call else "outside the model")
            self._root_calls += root_call

    # -- modules ------------------------------------------------------------------
    def _enter_module(self, module, args, kwargs):
        path = self._names.get(module, "?")
        call = self._calls.get(path, 0)
        self._calls[path] = call + 1
        if module is self.model and not self._stack:
            self._sync_step(root_call=True)
        layer = None
        if self._recording() and (self._module_re is None or self._module_re.search(path)):
            layer = len(self.layers)
            self._busy = True
            try:
                self.layers.append({
                    "index": layer,
                    "module": path,
                    "class": type(module).__name__,
                    "call": call,
                    "step": len(self.steps) - 1,
                    "parent": next((f.layer for f in reversed(self._stack) if f.layer is not None), None),
                    "inputs": self._tensor_leaves({"args": args, "kwargs": kwargs}),
                    "outputs": [],
                    "ops": [len(self.ops), len(self.ops)],
                })
            finally:
                self._busy = False
        self._stack.append(_Frame(layer, path, call))

    def _exit_module(self, module, args, kwargs, output):
        if not self._stack:
            return
        frame = self._stack.pop()
        if frame.layer is not None:
            rec = self.layers[frame.layer]
            rec["ops"][1] = len(self.ops)
            if output is not None:
                self._busy = True
                try:
                    rec["outputs"] = self._tensor_leaves(output)
                finally:
                    self._busy = False

    def _tensor_leaves(self, tree) -> list[dict]:
        """Tensors anywhere in a module's args/kwargs/outputs, with their pytree paths; a tensor the
        store cannot hold (sparse, ...) is named instead, so the module is known not to be a unit."""
        if isinstance(tree, torch.Tensor):  # the common single-tensor output, without pytree's cost
            return [self._leaf("", tree)]
        leaves, _ = tree_flatten_with_path(tree)
        return [self._leaf(keystr(p), v) for p, v in leaves if isinstance(v, torch.Tensor)]

    def _leaf(self, path: str, t: torch.Tensor) -> dict:
        try:
            return {"path": path, "tensor": self.writer.add(t)}
        except UncarvableTensor as e:
            return {"path": path, "uncarved": str(e)}

    # -- ops ----------------------------------------------------------------------
    def _recording(self) -> bool:
        return self.truncated is None

    def _source(self) -> str | None:
        f = sys._getframe(2)
        while f is not None:
            fn = f.f_code.co_filename
            internal = self._internal.get(fn)
            if internal is None:
                internal = self._internal[fn] = fn.startswith(_INTERNAL_DIRS) or fn.startswith("<")
            if not internal:
                return f"{fn}:{f.f_lineno}"
            f = f.f_back
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._busy or not self._recording():
            return func(*args, **kwargs)
        seq = self._seq
        self._seq += 1
        info = op_info(func)
        frame = self._stack[-1] if self._stack else None
        path = frame.path if frame else ""
        if self._module_re is not None and not self._module_re.search(path):
            return func(*args, **kwargs)
        if self.options.ops and not any(fnmatch.fnmatchcase(info.name, p) for p in self.options.ops):
            return func(*args, **kwargs)
        sig = signature(info.name, args, kwargs)
        if self.options.unique and sig in self._seen_sigs:
            return func(*args, **kwargs)
        self._seen_sigs.add(sig)
        self._sync_step(root_call=False)
        try:  # tapml's own failures are tapml's, named with the op: never "the model raised"
            rec = self._inputs(func, info, seq, path, frame, sig, args, kwargs)
        except StoreError:
            raise
        except Exception as e:
            raise CarveError(f"op {info.name} in {path or '(model)'}: {_why(e)}") from e
        out = func(*args, **kwargs)
        bump_undeclared(info, args, kwargs)
        try:
            add = self.writer.add if not info.mutated else (lambda t: self.writer.add(t, cached=False))
            rec["outputs"] = encode(out, add)
            produced = tensors_in(out)
            self.dataflow.made(rec["index"], produced)
            if not info.view:  # a view's memory was written by whoever wrote its base
                returned = {k for k, m in enumerate(info.returned) if m is not None}
                self.dataflow.wrote(rec["index"], produced, returned)
        except StoreError:
            raise
        except Exception as e:
            raise CarveError(f"op {info.name} in {path or '(model)'}: output: {_why(e)}") from e
        rec["view"] = info.view
        rec["inplace"] = bool(info.mutated)
        rec["nondeterministic"] = info.nondeterministic
        self.ops.append(rec)
        if self.options.max_bytes is not None and self.writer.bytes_stored >= self.options.max_bytes:
            self.truncated = f"--max-bytes {self.options.max_bytes} reached after op {rec['index']}"
        if self.on_op is not None:
            self.on_op(len(self.ops))
        return out


    def _inputs(self, func, info, seq: int, path: str, frame, sig: str, args, kwargs) -> dict:
        """The op's record up to its outputs (which exist only after it runs)."""
        add = self.writer.add
        rec = {
            "index": len(self.ops),
            "seq": seq,
            "op": info.name,
            "module": path,
            "call": frame.call if frame else 0,
            "layer": next((f.layer for f in reversed(self._stack) if f.layer is not None), None),
            "step": len(self.steps) - 1,
            "source": self._source(),
            "signature": sig,
            "args": ([encode(args[0], self.writer.add_storage)] + [encode(a, add) for a in args[1:]]
                     if func._opname in _STORAGE_READERS and args else encode(list(args), add)),
            "kwargs": encode(kwargs, add),
        }
        if func.namespace not in ALLOWED_NAMESPACES:
            rec["library"] = library_of(func)
        if info.mutated:
            self.writer.protect([
                t for m in info.mutated
                for t in tensors_in(args[m] if isinstance(m, int) and m < len(args) else kwargs.get(m))
            ])
        self.dataflow.read(rec["index"], tensors_in([list(args), kwargs]))
        return rec


_STORAGE_READERS = frozenset({"as_strided", "as_strided_", "as_strided_copy"})  # read their input's storage


class CarveError(TapmlError):
    """tapml could not record something the model did (a tensor kind it does not store, a bug of
    its own); the message names the op or module — the model itself is not blamed."""


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if isinstance(e, UncarvableTensor) and text else \
        f"{type(e).__name__}: {text[0][:300] if text else ''}"

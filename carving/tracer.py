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
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
from .leaves import leaf_paths
from .manifest import INPLACE, NONDETERMINISTIC, VIEW, Table
from .objects import Objects
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


def _token(value, tensor_token, key: list) -> None:
    """Append ``value``'s part of a signature key: tensors as ``(dtype, shape, stride)``, everything else
    tagged by kind (so ``True`` is not ``1`` and ``-0.0`` is not ``0.0``); brackets keep the structure."""
    if value is None or type(value) is int:
        key.append(value)
    elif isinstance(value, torch.Tensor):
        key.append(tensor_token(value))
    elif isinstance(value, bool):
        key.append("b1" if value else "b0")
    elif isinstance(value, (list, tuple)):
        key.append("[" if isinstance(value, list) else "(")
        for v in value:
            _token(v, tensor_token, key)
        key.append("]")
    elif isinstance(value, dict):
        key.append("{")
        for k, v in value.items():
            key.append(("k", k))
            _token(v, tensor_token, key)
        key.append("}")
    else:
        key.append(_scalar_token(value))


def _scalar_token(value):
    if isinstance(value, int):
        return ("i", int(value))
    if isinstance(value, (float, complex, str)):
        return (type(value).__name__[0], repr(value))
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return value
    return ("o", type(value).__name__)


def _tensor_token(t: torch.Tensor) -> tuple:
    if t.layout != torch.strided:  # sparse tensors have no strides (and are refused when stored)
        return (dtype_name(t.dtype), tuple(t.shape), str(t.layout))
    return (dtype_name(t.dtype), tuple(t.shape), tuple(t.stride()))


def _digest(key: list) -> str:
    return hashlib.sha1(repr(key).encode()).hexdigest()[:16]


def signature(name: str, args, kwargs) -> str:
    """Op identity for compile caches and de-duplication: overload, tensor metadata, other args.

    The tracer computes the same value from what it already knows of each tensor."""
    key: list = [name]
    _token(list(args), _tensor_token, key)
    _token(kwargs, _tensor_token, key)
    return _digest(key)


@dataclass(slots=True)
class _Frame:
    layer: int | None  # index into layers, None when the module is filtered out
    path: str
    call: int
    enclosing: int | None  # the innermost recorded layer at or above this module
    module: int  # the path's index in the manifest's strings


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
        self._filtered = bool(self._module_re or self.options.ops or self.options.unique)
        self._calls: dict[str, int] = {}
        self._stack: list[_Frame] = []
        self._seen_sigs: set[str] = set()
        self._sigs: dict[tuple, str] = {}  # signature key -> signature: hashed once per distinct call shape
        self._funcs: dict[int, tuple] = {}  # id(OpOverload) -> (OpInfo, reads storage, outside aten/prims, the op)
        self._step_token: tuple[int, str] | None = None
        self._busy = False
        self._handles = []
        self._internal: dict[object, bool] = {}  # code object -> inside torch/tapml (not the user's line)
        self._lines: dict[tuple, int] = {}  # (code object, line) -> "file:line" in strings
        self._seq = 0
        self._root_calls = 0
        self.objects = Objects(writer)
        self.strings = Table()  # op names, module paths and source lines, each once (the manifest's strings)
        self._root_module = self.strings("")
        self.dataflow = DataFlow()
        self.floats_exact = True  # no non-finite float inside a complex recorded (see store._dumps)
        self._watch = self.options.max_bytes is not None or on_op is not None

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
        outer = self._stack[-1].enclosing if self._stack else None
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
                    "parent": outer,
                    "inputs": self._tensor_leaves(args, kwargs),
                    "outputs": [],
                    "ops": [len(self.ops), len(self.ops)],
                })
            finally:
                self._busy = False
        self._stack.append(_Frame(layer, path, call, layer if layer is not None else outer, self.strings(path)))

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

    def _tensor_leaves(self, tree, kwargs=None) -> list[dict]:
        """Tensors anywhere in a module's args/kwargs (or its output, without ``kwargs``), with their pytree
        paths; a tensor the store cannot hold (sparse, ...) is named instead, so the module is known not to
        be a unit."""
        leaves = leaf_paths(tree) if kwargs is None else leaf_paths({"args": tree, "kwargs": kwargs})
        return [self._leaf(path, t) for path, t in leaves]

    def _leaf(self, path: str, t: torch.Tensor) -> dict:
        try:
            return {"path": path, "tensor": self.objects.entry(t).use}
        except UncarvableTensor as e:
            return {"path": path, "uncarved": str(e)}

    # -- ops ----------------------------------------------------------------------
    def _recording(self) -> bool:
        return self.truncated is None

    def _source(self) -> int | None:
        """The user's line that led to the op in flight (an index into strings): the innermost frame outside
        torch and tapml. Cached by (code object, instruction offset): ``f_lineno`` decodes the line table."""
        f = sys._getframe(2)
        internal = self._internal
        while f is not None:
            code = f.f_code
            inside = internal.get(code)
            if inside is None:
                fn = code.co_filename
                inside = internal[code] = fn.startswith(_INTERNAL_DIRS) or fn.startswith("<")
            if not inside:
                where = (code, f.f_lasti)
                line = self._lines.get(where)
                if line is None:
                    line = self._lines[where] = self.strings(f"{code.co_filename}:{f.f_lineno}")
                return line
            f = f.f_back
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._busy:
            return func(*args, **kwargs)
        seq = self._seq
        self._seq = seq + 1
        known = self._funcs.get(id(func))  # OpOverload hashes in Python: its id is cheaper (overloads live forever)
        if known is None:
            known = self._funcs[id(func)] = self._know(func)
        info, reads_storage, name, flags, library = known
        stack = self._stack
        frame = stack[-1] if stack else None
        if self.truncated is not None or (
                self._filtered and self._filtered_out(info, frame.path if frame else "", args, kwargs)):
            if info.mutated:  # not recorded, but it may write memory a pending shard still points at
                self.writer.protect(self._written(info, args, kwargs))
            return func(*args, **kwargs)
        index = len(self.ops)
        if _current_step.get() is not self._step_token or not self.steps:  # a step opened, closed, or none yet
            self._sync_step(root_call=False)
        try:  # tapml's own failures are tapml's, named with the op: never "the model raised"
            encoded, encoded_kwargs, sig = self._record_inputs(reads_storage, info, index, args, kwargs)
            if frame is None:
                row = [seq, name, self._root_module, 0, None, len(self.steps) - 1, self._source(), sig,
                       encoded, {"dict": encoded_kwargs}, None, flags]  # OP_COLUMNS
            else:
                row = [seq, name, frame.module, frame.call, frame.enclosing, len(self.steps) - 1, self._source(),
                       sig, encoded, {"dict": encoded_kwargs}, None, flags]
            if library:
                row += library
            if info.mutated:
                written = self._written(info, args, kwargs)
                self.writer.protect(written)
                self.objects.forget(written)  # resize_, t_, set_ change metadata too
        except StoreError:
            raise
        except Exception as e:
            raise CarveError(f"op {info.name} in {frame.path if frame else '(model)'}: {_why(e)}") from e
        out = func(*args, **kwargs)
        if info.undeclared:
            bump_undeclared(info, args, kwargs)
        try:
            if type(out) is torch.Tensor:
                row[10] = self._output(out, index, info, 0).enc
            else:
                self._out = (index, info, [0])
                row[10] = encode(out, self._output_use)
                if not self._floats_exact(out):
                    self.floats_exact = False
        except StoreError:
            raise
        except Exception as e:
            raise CarveError(f"op {info.name} in {frame.path if frame else '(model)'}: output: {_why(e)}") from e
        self.ops.append(row)
        if self._watch:
            self._after(index)
        return out

    @staticmethod
    def _written(info, args, kwargs) -> list[torch.Tensor]:
        """The tensors an op writes in place (its schema's mutated arguments)."""
        return [t for m in info.mutated
                for t in tensors_in(args[m] if isinstance(m, int) and m < len(args) else kwargs.get(m))]

    def _after(self, index: int) -> None:
        """The per-op checks only some carves ask for: ``--max-bytes``, a progress callback."""
        if self.options.max_bytes is not None and self.writer.bytes_stored >= self.options.max_bytes:
            self.truncated = f"--max-bytes {self.options.max_bytes} reached after op {index}"
        if self.on_op is not None:
            self.on_op(len(self.ops))

    def _know(self, func) -> tuple:
        """What every call of ``func`` shares: (OpInfo, reads its input's storage, op name string, flags,
        the row's optional library column)."""
        info = op_info(func)
        library = []
        if func.namespace not in ALLOWED_NAMESPACES:  # the module that registers it, so a reader can import it
            module = library_of(func)
            library = [self.strings(module) if module else None]
        flags = VIEW * info.view + INPLACE * bool(info.mutated) + NONDETERMINISTIC * info.nondeterministic
        return info, func._opname in _STORAGE_READERS, self.strings(info.name), flags, library

    def _filtered_out(self, info, path: str, args, kwargs) -> bool:
        if self._module_re is not None and not self._module_re.search(path):
            return True
        if self.options.ops and not any(fnmatch.fnmatchcase(info.name, p) for p in self.options.ops):
            return True
        if self.options.unique:
            sig = signature(info.name, args, kwargs)
            if sig in self._seen_sigs:
                return True
            self._seen_sigs.add(sig)
        return False

    def _record_inputs(self, reads_storage: bool, info, index: int, args, kwargs) -> tuple[list, dict, str]:
        """The op's encoded args and kwargs (as ``encode`` writes them), its signature from the same walk, and
        the data flow into it — one pass, since this runs for every op. A tensor argument seen before and
        unchanged (a weight, an activation: most of them) takes the inlined path: one dict hit."""
        key = [info.name, "["]
        encoded, position = [], 0
        seen, objects, flow = self.objects.seen, self.objects, self.dataflow
        written = flow.written
        referenced = 0
        for i, v in enumerate(args):
            if isinstance(v, torch.Tensor):
                if i == 0 and reads_storage:
                    encoded.append({"tensor": objects.add_use(self.writer.add_storage(v))})  # reads beyond the view
                    key.append(_tensor_token(v))
                    flow.read(index, 0, objects.observe(v))
                    position = 1
                    continue
                e = seen.get(id(v))
                if e is not None and e.version is not None and e.obj() is v and e.version == v._version:
                    referenced += e.nbytes  # the inlined hit path of Objects.entry and DataFlow.read
                    e.now = e.version
                    if e.maker is not None:
                        flow.flow += (e.maker[0], e.maker[1], index, position)
                    if e.storage is not None:
                        hit = written.get(e.storage)
                        if hit is not None and hit[3] == e.now and hit[2]() is not None:
                            flow.edges += (hit[0], hit[1], index, position)
                else:
                    e = objects.entry(v)
                    if e.maker is not None or e.storage is not None:
                        flow.read(index, position, e)
                key.append(e.token)
                encoded.append(e.enc)
                position += 1
                continue
            if v is None or type(v) is int:  # the common scalars, as _value has them
                key.append(v)
                encoded.append(v)
                continue
            enc, position = self._value(v, key, index, position)
            encoded.append(enc)
        key += ("]", "{")
        encoded_kwargs = {}
        for k, v in kwargs.items():
            key.append(("k", k))
            encoded_kwargs[k], position = self._value(v, key, index, position)
        key.append("}")
        self.writer.bytes_referenced += referenced
        key = tuple(key)
        sig = self._sigs.get(key)
        if sig is None:
            token_of = self.objects.token_of
            sig = self._sigs[key] = _digest([token_of.get(x, x) if type(x) is str else x for x in key])
        return encoded, encoded_kwargs, sig

    def _value(self, v, key: list, index: int, position: int) -> tuple:
        """One argument: its encoding (as ``encode``), its signature tokens (as ``_token``) appended to
        ``key``, each tensor's data flow recorded. Returns ``(encoded, next input position)``."""
        if isinstance(v, torch.Tensor):
            e = self.objects.entry(v)
            key.append(e.token)
            if e.maker is not None or e.storage is not None:
                self.dataflow.read(index, position, e)
            return e.enc, position + 1
        tp = type(v)
        if v is None or tp is int:
            key.append(v)
            return v, position
        if tp is bool:
            key.append("b1" if v else "b0")
            return v, position
        if tp is float:
            r = repr(v)
            key.append(("f", r))
            return (v if math.isfinite(v) else {"float": r}), position
        if isinstance(v, (list, tuple)):
            key.append("[" if isinstance(v, list) else "(")
            items = []
            for x in v:
                enc, position = self._value(x, key, index, position)
                items.append(enc)
            key.append("]")
            return (items if isinstance(v, list) else {"tuple": items}), position
        if isinstance(v, dict):  # not an aten argument type: the generic walk
            tensors = tensors_in(v)
            entries = [self.objects.entry(t) for t in tensors]
            for e in entries:
                self.dataflow.read(index, position, e)
                position += 1
            refs = iter(entries)
            _token(v, lambda _: next(refs).token, key)
            refs = iter(entries)
            if not self._floats_exact(v):
                self.floats_exact = False
            return encode(v, lambda _: next(refs).use), position
        key.append(_scalar_token(v))
        if not self._floats_exact(v):
            self.floats_exact = False
        return encode(v, None), position

    @staticmethod
    def _floats_exact(value) -> bool:
        """False when ``encode(value)`` holds a non-finite float (inside a complex: plain floats are encoded
        as text) that only the stdlib JSON encoder writes as itself (see ``store._dumps``)."""
        if type(value) is complex:
            return math.isfinite(value.real) and math.isfinite(value.imag)
        if isinstance(value, (list, tuple)):
            return all(Tracer._floats_exact(v) for v in value)
        if isinstance(value, dict):
            return all(Tracer._floats_exact(v) for v in value.values())
        return True

    def _output(self, t: torch.Tensor, index: int, info, k: int):
        """Output ``k`` of op ``index``: recorded, marked as its output, its memory as written. Returns its
        entry."""
        e = self.objects.entry(t, cached=not info.mutated)
        e.maker = (index, k)
        if not info.view and e.storage is not None:  # a view's memory was written by whoever wrote its base
            self.dataflow.wrote(index, k, t, e, bool(info.mutated) and k < len(info.returned)
                                and info.returned[k] is not None)
        return e

    def _output_use(self, t: torch.Tensor) -> int:
        """``_output`` for ``encode``'s walk over a non-tensor result (a tuple, a list)."""
        index, info, slot = self._out
        k = slot[0]
        slot[0] += 1
        return self._output(t, index, info, k).use

    def producers(self, tensors: list) -> list[list[int] | None]:
        """For each model output tensor, ``[op, slot]`` of the op that wrote its memory last, or None."""
        return self.dataflow.producers(tensors)

    def makers(self, tensors: list) -> list[list[int] | None]:
        """For each model output tensor object, ``[op, slot]`` of the op that returned it, or None."""
        return [list(m) if (m := self.objects.maker(t)) is not None else None for t in tensors]


_STORAGE_READERS = frozenset({"as_strided", "as_strided_", "as_strided_copy"})  # read their input's storage


class CarveError(TapmlError):
    """tapml could not record something the model did (a tensor kind it does not store, a bug of
    its own); the message names the op or module — the model itself is not blamed."""


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if isinstance(e, UncarvableTensor) and text else \
        f"{type(e).__name__}: {text[0][:300] if text else ''}"

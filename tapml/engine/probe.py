"""The reference run before migrating: proof that the live model still runs the carved path.

Why: carved ops are matched to the live run by dispatch order. If the model now
dispatches other ops (data-dependent control flow, a flag flipped by its first
call) or reads other weights (a model that rescales its own parameters in place
on every forward), no carved op can be trusted to stand for its live twin, and
a run that went ahead would report "ok" about something it never compared.
The probe checks the op sequence and every tensor the run reads without having
produced it (weights, buffers, inputs) against the carve, and notes which model
outputs come from uninitialized memory (they are not compared end to end).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map

from tapml.carving import FixtureStore, ModelRaised, tensor_key
from tapml.core import (
    UNINITIALIZED,
    HashMemo,
    TapmlError,
    bump_undeclared,
    byte_view,
    content_key,
    iter_specs,
    op_info,
    tensors_in,
)

__all__ = ["probe", "ProbeResult", "OffCarvedPath", "rng_replay", "ModelState"]


_FILLS = frozenset({"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_",
                    "geometric_", "cauchy_", "log_normal_"})


class OffCarvedPath(TapmlError):
    """The live model no longer runs what was carved; the message says where it departs."""


@dataclass
class ProbeResult:
    output: Any
    wall_s: float
    excluded: dict[int, str] = field(default_factory=dict)  # model output index -> why it is not compared


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.numel() else 0


class _Probe(TorchDispatchMode):
    def __init__(self, store: FixtureStore):
        super().__init__()
        self.by_seq = {rec["seq"]: rec for rec in store.ops}
        self.seq = 0
        self.produced: dict[int, int] = {}  # storage -> the op that last wrote it in this run
        self.memo = HashMemo()
        self.tainted: set[int] = set()  # ops whose output depends on uninitialized memory
        self.departure: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.by_seq.get(self.seq)
        self.seq += 1
        if self.departure is None:
            self._check(func, rec, args, kwargs)
        info = op_info(func)
        if rec is not None and self._taints(func, info, args, kwargs):
            self.tainted.add(rec["index"])
        out = func(*args, **kwargs)
        bump_undeclared(info, args, kwargs)
        if rec is not None and not rec["view"]:  # a view's memory was made by whoever made its base
            for t in tensors_in(out):
                if isinstance(t, torch.Tensor) and t.numel():
                    self.produced[_ptr(t)] = rec["index"]
        return out

    def _taints(self, func, info, args, kwargs) -> bool:
        """Whether this op's result depends on uninitialized memory (``empty`` and what reads it)."""
        if func._opname in UNINITIALIZED:
            return True
        overwritten = set()  # an argument the op fills entirely does not pass on what it held
        if torch.Tag.out in func.tags or func._opname in _FILLS:
            for m in info.mutated:
                t = args[m] if isinstance(m, int) and m < len(args) else kwargs.get(m)
                overwritten |= {_ptr(x) for x in tensors_in(t)}
        return any(self.produced.get(_ptr(t)) in self.tainted for t in tensors_in([args, kwargs])
                   if t.numel() and _ptr(t) not in overwritten)

    def _check(self, func, rec: dict | None, args, kwargs) -> None:
        if rec is None:
            self.departure = f"the model now dispatches more ops than when carved ({func} after op {self.seq - 2})"
            return
        if rec["op"] != str(func):
            self.departure = f"op {rec['index']}: the model now calls {func} where the carve recorded {rec['op']}"
            return
        refs = list(iter_specs([rec["args"], rec["kwargs"]]))
        for t, ref in zip(tensors_in([args, kwargs]), refs, strict=False):
            if not t.numel() or _ptr(t) in self.produced:
                continue  # made during this run: compared step by step, not here
            shape = list(t.shape)
            if ref.get("storage"):  # recorded as its whole storage (as_strided reads beyond the view)
                n = t.untyped_storage().nbytes() // t.element_size()
                t = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (n,), (1,))
            key = tensor_key(t, self.memo)  # a weight read by many ops is hashed once
            if key != ref["key"] or shape != ref["shape"]:
                self.departure = (f"op {rec['index']} ({rec['op']} in {rec['module'] or '(model)'}) reads a "
                                  f"{ref['dtype']}{list(t.shape)} tensor the run did not make (a weight, buffer or "
                                  "input) whose values differ from the carve: the model changes its own state "
                                  "between calls, or was given other inputs")
                return


class ModelState:
    """A model's parameters, buffers and input tensors as they are now, to put back before every live run.

    Why: a model that updates its own state on each call (batch norm's running statistics in
    training mode, a weight rescaled in place) would compute something else in every live run
    than it did when carved. Taken before the carve, this makes each live run the carved one.
    CPU tensors are kept in an unlinked temporary file with their content keys, not as clones: a
    copy of every weight would double the client's memory at 1B parameters, and most runs change
    nothing, so ``restore`` hashes each tensor (a ``.data`` write bumps no version counter) and reads
    back only what changed."""

    def __init__(self, model: torch.nn.Module, inputs: Any = None):
        seen, self.saved, self._full = set(), [], False
        self._file = tempfile.TemporaryFile(prefix="tapml-state-")
        given = [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.layout == torch.strided]
        for t in itertools.chain(model.parameters(), model.buffers(), given):
            if id(t) not in seen:
                seen.add(id(t))
                self.saved.append((t, self._keep(t)))

    def _keep(self, t: torch.Tensor) -> tuple | torch.Tensor:
        """(shape, dtype, offset, content key) of a CPU tensor's bytes written to the file; a clone otherwise
        (another device, another layout, or no room left on the disk)."""
        if self._full or t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
            return t.detach().clone()
        view = byte_view(t)
        offset = self._file.seek(0, os.SEEK_END)
        try:
            self._file.write(view)
        except OSError:  # a full disk: this and every later tensor kept in memory, as clones
            self._full = True
            return t.detach().clone()
        return tuple(t.shape), t.dtype, offset, content_key(t.detach().reshape(-1), view)

    def _value(self, shape: tuple, dtype: torch.dtype, offset: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            self._file.seek(offset)
            self._file.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        return out

    def resident(self) -> dict[str, torch.Tensor]:
        """The CPU tensors kept, by the content key they had when taken (``FixtureStore.share``)."""
        return {kept[3]: t for t, kept in self.saved if isinstance(kept, tuple)}

    def restore(self) -> None:
        with torch.no_grad():
            for t, kept in self.saved:
                if isinstance(kept, torch.Tensor):
                    if t.shape == kept.shape:
                        t.copy_(kept)
                    continue
                shape, dtype, offset, key = kept
                if tuple(t.shape) == shape and (t.dtype != dtype or content_key(t.detach().reshape(-1)) != key):
                    t.copy_(self._value(shape, dtype, offset))


class rng_replay:  # noqa: N801 — a context manager used like a function
    """Every live run starts from the generator state the carve started from (random ops repeat
    exactly) and, with ``restore``, from the model state it started from; the caller's generator
    state is put back afterwards."""

    def __init__(self, store: FixtureStore, restore: Callable[[], None] | None = None):
        self.state, self.restore = store.rng_state(), restore

    def __call__(self, run: Callable[[], Any]) -> Callable[[], Any]:
        def fresh():
            with _disable_current_modes():  # not ops of the model: no dispatch mode may see them
                if self.restore is not None:
                    self.restore()
                if self.state is not None:
                    torch.random.set_rng_state(self.state)
            return run()

        return fresh

    def __enter__(self):
        self.saved = torch.random.get_rng_state()
        return self

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.saved)
        if self.restore is not None:
            self.restore()


def probe(run: Callable[[], Any], store: FixtureStore) -> ProbeResult:
    """Run the model on the reference once, checking it against the carve; ``OffCarvedPath`` if it departs."""
    mode = _Probe(store)
    start = time.perf_counter()
    try:
        with torch.no_grad(), mode:
            output = run()
    except (Exception, SystemExit) as e:
        raise ModelRaised(f"{type(e).__name__}: {e}") from e
    wall = time.perf_counter() - start
    carved = len(store.ops)
    if mode.departure is None and mode.seq != carved:
        mode.departure = f"the model dispatched {mode.seq} ops now but {carved} when carved"
    if mode.departure is not None:
        raise OffCarvedPath(f"the live model does not repeat the carve: {mode.departure} — carve it again "
                            "(or fix the nondeterminism) before offloading")
    excluded = {}
    for i, t in enumerate(x for x in tree_leaves(output) if isinstance(x, torch.Tensor)):
        producer = mode.produced.get(_ptr(t))
        if producer is not None and producer in mode.tainted:
            excluded[i] = (f"model output {i} depends on uninitialized memory (op {producer}, "
                           f"{store.ops[producer]['op']}, reads what an empty() left): not compared")
    with _disable_current_modes():  # a copy: a later live run may write into what this one returned
        output = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, output)
    return ProbeResult(output, wall, excluded)

"""Per-op offload, pipelined: selected ops sent to the target without waiting for each answer.

Why: in per-op offload every op was a round trip, and across a socket the round trips were most
of the offload's time. A target that takes a run before answering the last (``pipelines``)
gets each selected op as the live run reaches it; the op's outputs become placeholders in the
carved layout (NaN, as unit stand-ins are: a placeholder read by mistake can never look right),
named for the worker so a later op takes them as held inputs, and the live run goes on. The
answers are read, each op judged and its placeholders filled, when the reference is about to
read a placeholder or write anything in place, when the bytes in flight reach their bound, and
at the end of the step. An answer that cannot be used as it came (an error, a wrong shape, a
worker replaced meanwhile) makes that op, and every later one in flight — they may have read
it — run again one at a time, as they would have without pipelining. Compiled units (top-down)
travel the same way (``send_unit``): their live outputs are the pending tensors.

What is not pipelined (it runs one at a time, after the answers in flight): ops that write in
place, ops with no tensor input (torch's factory bindings detach a result Python holds, which
would change the live run), ops whose carved outputs are not contiguous from offset 0 or are
empty, an op's first run (its signature is prepared first), and everything when the reference
runs elsewhere than the CPU.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable

import torch

from tapml.core import OpCall, OpFailed, Status, UnitCall, decode_value, op_info, overwrite, tensors_in
from tapml.platforms import Target

__all__ = ["InFlight", "Sent", "crashed_or_hung"]


class Sent:
    """One op (or unit: ``op`` is a ``UnitCall``, ``rec`` and the call are None) whose run is on its way:
    what it needs to be judged, filled, or run again."""

    __slots__ = ("index", "rec", "func", "args", "kwargs", "op", "live", "outs")

    def __init__(self, index: int, rec: dict | None, func, args, kwargs, op: OpCall | UnitCall,
                 live: list[torch.Tensor], outs: list[torch.Tensor]):
        self.index, self.rec, self.func, self.args, self.kwargs = index, rec, func, args, kwargs
        self.op, self.live = op, live
        # weak: a result Python holds changes what torch's bindings do; the storage is kept alive by any view
        self.outs = [(weakref.ref(t), weakref.ref(t.untyped_storage()), t.shape, t.stride(), t.dtype) for t in outs]

    def placeholders(self) -> list[torch.Tensor | None]:
        """Each output's placeholder, or a tensor over its memory when only a view of it lives on (None:
        nothing holds it, nothing will read it)."""
        return [t if (t := out[0]()) is not None else _over(*out[1:]) for out in self.outs]

    def memory(self) -> list[torch.Tensor | None]:
        """A tensor over each output's memory as it was sent (None: nothing holds that memory any more),
        whatever the live tensor was rebound to since."""
        return [_over(*out[1:]) for out in self.outs]


def _over(storage: weakref.ref, shape, stride, dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor of this layout over that storage, if it still lives."""
    st = storage()
    return torch.empty(0, dtype=dtype).set_(st, 0, shape, stride) if st is not None else None


def crashed_or_hung(error: BaseException | None) -> bool:
    """A run's error that running it again one at a time would only repeat (the others say why then)."""
    return isinstance(error, OpFailed) and error.status in (Status.CRASHED, Status.TIMEOUT)


def _placeholder(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    if dtype.is_floating_point or dtype.is_complex:
        return t.fill_(float("nan"))
    return t.fill_(True if dtype == torch.bool else torch.iinfo(dtype).max)


def _pipelinable(op: OpCall, func) -> bool:
    if op_info(func).mutated or not op.inputs:
        return False
    return all(s.contiguous and all(s.shape) for s in op.output_specs)


Settle = Callable[[Sent, list[torch.Tensor] | None, BaseException | None, float], tuple[list | None, bool]]


class InFlight:
    """The ops sent and not yet answered, and the names of their placeholders' memory.

    ``settle(sent, outputs, error, kernel_s)`` judges an answer and returns ``(values, clean)``:
    what fills the placeholders (None: run the op again) and whether later ops may keep their
    answers; ``rerun(sent)`` runs an op again one at a time and returns its values."""

    def __init__(self, target: Target, settle: Settle, rerun: Callable[[Sent], list[torch.Tensor]]):
        self.target, self.settle, self.rerun = target, settle, rerun
        self.sent: deque[Sent] = deque()
        self._names: dict[int, tuple[weakref.ref, str]] = {}  # storage address -> (that storage, its name)
        self._fits: dict[int, bool] = {}  # op index -> pipelinable
        self.target_s = 0.0
        self.pipelined = 0  # ops sent without waiting

    def name(self, t: torch.Tensor) -> str | None:
        """The name of the pending output ``t`` is (a view of), or None."""
        if not self._names or not t.numel():
            return None
        hit = self._names.get(t.untyped_storage().data_ptr())
        return hit[1] if hit is not None and hit[0]() is not None else None

    def blocks(self, func, args, kwargs) -> bool:
        """Whether a reference op must wait for the answers: it reads a placeholder or writes in place."""
        if not self.sent:
            return False
        info = op_info(func)
        if info.view:  # a view reads nothing: it aliases the placeholder, filled in place later
            return False
        return bool(info.mutated) or any(self.name(t) is not None for t in tensors_in([args, kwargs]))

    def send(self, index: int, rec: dict, func, args, kwargs, op: OpCall, live: list[torch.Tensor]) -> object:
        """The op's outputs as placeholders once its run is sent; None when it was not (run it one at a time)."""
        fits = self._fits.get(index)
        if fits is None:
            fits = self._fits[index] = _pipelinable(op, func)
        if not fits or any((t.is_conj() or t.is_neg()) and self.name(t) is not None for t in live):
            return None
        names = self._send(lambda: self.target.send_run(op, live, self.name))
        if names is None:
            return None
        outs = [_placeholder(s.shape, s.torch_dtype) for s in op.output_specs]
        self._pending(Sent(index, rec, func, args, kwargs, op, live, outs), names)
        made = iter(outs)
        return decode_value(rec["outputs"], lambda _: next(made))

    def send_unit(self, unit: UnitCall, inputs: list[torch.Tensor], outs: list[torch.Tensor]) -> Sent | None:
        """A unit's run, sent without waiting: its live outputs (``outs``, each contiguous from offset 0, as
        the worker holds them) become pending under names, as an op's placeholders do; None when it was not
        sent (run it one at a time)."""
        names = self._send(lambda: self.target.send_unit(unit, inputs, self.name))
        if names is None:
            return None
        return self._pending(Sent(unit.index, None, None, None, None, unit, inputs, outs), names)

    def _send(self, send: Callable[[], list[str] | None]) -> list[str] | None:
        """The names a send gave the outputs, None when nothing was sent; its time counted as the target's."""
        start = time.perf_counter()
        try:
            return send()
        except OpFailed:  # the connection broke: the worker is replaced; what was in flight runs again
            return None
        finally:
            self.target_s += time.perf_counter() - start

    def _pending(self, s: Sent, names: list[str]) -> Sent:
        """``s`` in flight, each output's memory pending under its name (one name per output)."""
        for t, name in zip((ref() for ref, *_ in s.outs), names, strict=True):
            storage = t.untyped_storage()
            self._names[storage.data_ptr()] = (weakref.ref(storage), name)
        self.sent.append(s)
        self.pipelined += 1
        return s

    def poll(self) -> None:
        """Judge and fill the answers that have already come: the comparison overlaps the target's work on
        later ops instead of waiting for the end of the step."""
        while self.sent and self.target.answer_ready():
            self._settle_oldest()

    def drain(self) -> None:
        """Every run in flight answered, judged and filled, in order: each judged as it comes, while the
        target still works on the later ones."""
        try:
            while self.sent:
                self._settle_oldest()
        except BaseException:  # judging failed (a MemoryError, Ctrl-C): the target must not stay out of step
            self._read_past()
            raise

    def _read_past(self) -> None:
        """The answers still due, read and dropped: the target's next run starts in step with this client."""
        try:
            self._receive([None] * len(self.sent))
        finally:
            self.sent.clear()
            self._names.clear()

    def _settle_oldest(self) -> None:
        s = self.sent.popleft()
        [(outputs, error, kernel_s)] = self._receive([s])
        values, clean = self.settle(s, outputs, error, kernel_s)
        if values is not None and clean:
            self._forget(s)
            _fill(self.target, s, values, outputs)
            return
        # later runs may have read this op's outputs: each runs again one at a time, after every
        # answer in flight is read (nothing else may be in flight then)
        rest = list(self.sent)
        self._read_past()
        _fill(self.target, s, values if values is not None else self.rerun(s), None)
        for r in rest:
            _fill(self.target, r, self.rerun(r), None)

    def _receive(self, batch: list[Sent | None]) -> list[tuple]:
        """The answers to ``batch`` (None: an answer read past), each received in its placeholders."""
        start = time.perf_counter()
        try:
            return [self.target.receive_run(s.placeholders() if s is not None else None) for s in batch]
        finally:
            self.target_s += time.perf_counter() - start

    def _forget(self, s: Sent) -> None:
        for _, storage, *_ in s.outs:
            st = storage()
            if st is not None:
                self._names.pop(st.data_ptr(), None)


def _fill(target: Target, s: Sent, values: list[torch.Tensor], received: list[torch.Tensor] | None) -> None:
    """Write ``values`` into the op's placeholders (``received``: the target's outputs they came from, so
    a remote target knows the worker holds the filled tensors)."""
    for k, (t, v) in enumerate(zip(s.placeholders(), values, strict=True)):
        if t is None or t is v:  # nothing holds it, or it was received in place
            continue
        overwrite(t, v)  # a cached key of the placeholder's memory (the answer it was received in) is void now
        if received is not None and v is received[k]:
            target.adopt(t, v)

"""The exact answer: the carved graph replayed in float64, for the end-to-end verdict.

Why: "the model output is off by 2e-5" means nothing alone — any correct compiler
that sums in another order lands about as far from the truth as the reference
does. The truth is the same computation in float64 (same ops, same control path,
float dtype arguments widened, as PyTorch's accuracy minifier does). The graph
is replayed op by op from the store, following tensor objects (``flow`` edges),
so no model object is needed and a store carved elsewhere works too. Random and
uninitialized ops, and any op that cannot run in float64, contribute their
carved outputs instead.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import torch

from tapml.carving import FixtureStore
from tapml.core import decode_value, dtype_from_name, iter_specs, place_device, resolve_op, tensors_in

__all__ = ["exact_outputs", "WidenedCache"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
CACHE_BYTES = 1 << 30  # widened weights kept for reuse: float64 is 4× a bfloat16 model, 20 GB at 1.1B parameters


class WidenedCache:
    """Widened leaves (weights, constants) by content key, least recently used dropped past a byte
    budget: a decode step reads every weight again, but not all of them need to stay widened. With
    ``reads`` (content key -> how many reads are left), a leaf no later op reads is not kept: one
    forward reads most weights once, and an LRU cache smaller than the model never hits anyway."""

    def __init__(self, budget: int = CACHE_BYTES, reads: Counter | None = None):
        self.budget, self.used, self.reads = budget, 0, reads
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def read(self, key: str) -> None:
        """One read of ``key`` done: after its last one it is dropped."""
        if self.reads is not None:
            self.reads[key] -= 1
            if self.reads[key] <= 0 and key in self._items:
                old = self._items.pop(key)
                self.used -= old.numel() * old.element_size()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __getitem__(self, key: str) -> torch.Tensor:
        self._items.move_to_end(key)
        return self._items[key]

    def __setitem__(self, key: str, t: torch.Tensor) -> None:
        if key in self._items or (self.reads is not None and self.reads[key] <= 1):
            return
        self._items[key] = t
        self.used += t.numel() * t.element_size()
        while self.used > self.budget and self._items:
            _, old = self._items.popitem(last=False)
            self.used -= old.numel() * old.element_size()


def _widen(value):
    if isinstance(value, torch.Tensor):
        return value.double() if value.dtype in _FLOATS else value
    if isinstance(value, torch.dtype):
        return torch.float64 if value in _FLOATS else value
    if isinstance(value, (list, tuple)):
        return type(value)(_widen(v) for v in value)
    if isinstance(value, dict):
        return {k: _widen(v) for k, v in value.items()}
    return value


def _float_returns(store: FixtureStore) -> bool:
    """Whether any model output is a float tensor: only those are judged against the float64 run (a
    generation returns token ids, and replaying 1B parameters in float64 for them is wasted)."""
    for o in store.graph.returns:
        specs = list(iter_specs(store.ops[o[0]]["outputs"])) if o is not None else []
        if o is not None and o[1] < len(specs) and dtype_from_name(specs[o[1]]["dtype"]).is_floating_point:
            return True
    return False


def _leaf_reads(store: FixtureStore) -> Counter:
    """How often each stored leaf is read from the store (not through a data-flow edge) by a non-in-place op."""
    reads: Counter = Counter()
    for rec in store.ops:
        if not rec["inplace"]:
            sources = store.graph.flow.get(rec["index"], {})
            reads.update(ref["key"] for p, ref in enumerate(iter_specs([rec["args"], rec["kwargs"]]))
                         if p not in sources and not ref.get("storage"))
    return reads


def exact_outputs(store: FixtureStore, cache_bytes: int = CACHE_BYTES) -> list[torch.Tensor | None] | None:
    """The model's output tensors computed in float64 (None per output it cannot give; None overall
    for a store carved without data flow)."""
    graph = store.graph
    if not graph.known or not graph.returns:
        return None
    if not _float_returns(store):
        return [None] * len(graph.returns)
    values: dict[tuple[int, int], torch.Tensor] = {}
    left = dict(graph.uses)
    for o in graph.returns:
        if o is not None:
            left[o] = left.get(o, 0) + 1
    leaves = WidenedCache(cache_bytes, _leaf_reads(store))  # a weight read again is widened once while it fits
    with torch.no_grad():
        for rec in store.ops:
            j = rec["index"]
            sources = graph.flow.get(j, {})
            refs = list(iter_specs([rec["args"], rec["kwargs"]]))
            cache = leaves if not rec["inplace"] else {}  # a write must not reach other reads of the same bytes
            inputs = [_input(store, values, cache, sources.get(p), ref) for p, ref in enumerate(refs)]
            outputs = _run(store, rec, inputs)
            for k, t in enumerate(outputs):
                if (j, k) in left:
                    values[(j, k)] = t
            for p in sources.values():  # free what no later op reads
                left[p] -= 1
                if left[p] == 0:
                    values.pop(p, None)
    return [values.get(o) if o is not None else None for o in graph.returns]


def _input(store: FixtureStore, values: dict, leaves: WidenedCache | dict, source, ref: dict) -> torch.Tensor:
    if source is not None and source in values:
        return values[source]
    if ref.get("storage"):
        return _widen(store.load(ref))
    key = ref["key"]
    if key not in leaves:
        t = leaves[key] = _widen(store.load(ref))
    else:
        t = leaves[key]  # the same bytes, maybe another layout: rebuild this use's layout from it
        if list(t.shape) != ref["shape"] or list(t.stride()) != ref["stride"]:
            t = _widen(store.load(ref))
    if isinstance(leaves, WidenedCache) and source is None:
        leaves.read(key)  # after its last read a leaf is dropped
    return t


def _run(store: FixtureStore, rec: dict, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    carved = None
    if not rec["nondeterministic"]:
        try:
            it = iter(inputs)
            args = decode_value(rec["args"], lambda _: next(it))
            kwargs = place_device(decode_value(rec["kwargs"], lambda _: next(it)), "cpu")
            out = resolve_op(rec["op"], rec.get("library") or "")(*_widen(args), **_widen(kwargs))
            return tensors_in(out)
        except Exception:  # an op with no float64 kernel, or a refused one: its carved outputs stand in
            pass
    carved = [_widen(store.load(ref)) for ref in iter_specs(rec["outputs"])]
    return carved

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

from collections import OrderedDict

import torch

from tapml.carving import FixtureStore
from tapml.core import decode_value, iter_specs, place_device, resolve_op, tensors_in

__all__ = ["exact_outputs", "WidenedCache"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
CACHE_BYTES = 1 << 30  # widened weights kept for reuse: float64 is 4× a bfloat16 model, 20 GB at 1.1B parameters


class WidenedCache:
    """Widened leaves (weights, constants) by content key, least recently used dropped past a byte
    budget: a decode step reads every weight again, but not all of them need to stay widened."""

    def __init__(self, budget: int = CACHE_BYTES):
        self.budget, self.used = budget, 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __getitem__(self, key: str) -> torch.Tensor:
        self._items.move_to_end(key)
        return self._items[key]

    def __setitem__(self, key: str, t: torch.Tensor) -> None:
        if key in self._items:
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


def exact_outputs(store: FixtureStore, cache_bytes: int = CACHE_BYTES) -> list[torch.Tensor | None] | None:
    """The model's output tensors computed in float64 (None per output it cannot give; None overall
    for a store carved without data flow)."""
    graph = store.graph
    if not graph.known or not graph.returns:
        return None
    values: dict[tuple[int, int], torch.Tensor] = {}
    left = dict(graph.uses)
    for o in graph.returns:
        if o is not None:
            left[o] = left.get(o, 0) + 1
    leaves = WidenedCache(cache_bytes)  # a weight read by many ops is widened once while it fits
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
    if ref.get("key") not in leaves or ref.get("storage"):
        t = _widen(store.load(ref))
        if ref.get("storage"):
            return t
        leaves[ref["key"]] = t
        return t
    cached = leaves[ref["key"]]  # the same bytes, maybe another layout: rebuild this use's layout from it
    return cached if list(cached.shape) == ref["shape"] and list(cached.stride()) == ref["stride"] \
        else _widen(store.load(ref))


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

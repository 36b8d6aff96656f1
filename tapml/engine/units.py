"""Units: a carved module call turned into one program (``UnitCall``) a target compiles whole.

Why from the store and not ``torch.export`` of the live module: the carve holds the
exact kernels that ran inside the call and their data flow (``Graph.flow``: which
op made each tensor object an op read), so any module call of any eager model is a
program — a KV cache object, a data-dependent branch, a Python-made constant are
already resolved. What a unit cannot be is said in one line, and the plan then
descends to the module's children: random ops (they would draw again), ops that
return Python values (data-dependent shapes), writes into the unit's own inputs
(a cache updated in place), reads of raw storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from tapml.carving import FixtureStore
from tapml.core import UNINITIALIZED, OpRefused, UnitCall, check_value, iter_specs, only_tensors, op_info_by_name

__all__ = ["UnitSpan", "build_unit", "unit_inputs", "carved_outputs", "children_of", "Units"]


@dataclass
class UnitSpan:
    """Where a unit's values live in the carved run: its ops ``[first, end)`` and each output's op/slot."""

    layer: int
    first: int
    end: int
    outputs: list[tuple[int, int]]  # carved (op, slot) of each unit output
    inputs: list[tuple[int, int]]  # the first read of each unit input: (op, position among its tensor inputs)


def _last_reads(store: FixtureStore) -> dict[tuple[int, int], int]:
    """For each op output object: the last op that reads it (by object identity, ``Graph.flow``)."""
    last: dict[tuple[int, int], int] = {}
    for j, reads in store.graph.flow.items():
        for src in reads.values():
            if last.get(src, -1) < j:
                last[src] = j
    return last


def build_unit(store: FixtureStore, layer: int, last_reads: dict | None = None) -> tuple[UnitCall, UnitSpan] | str:
    """Module call ``layer`` as a unit, or the one-line reason it cannot be one."""
    rec = store.layers[layer]
    a, b = rec["ops"]
    if b <= a or not store.graph.known:
        return "no ops inside" if b <= a else "the store has no data flow (carved before it was recorded)"
    flow = store.graph.flow
    last_reads = _last_reads(store) if last_reads is None else last_reads
    inputs: list[dict] = []
    first_read: list[tuple[int, int]] = []
    external: dict[object, int] = {}  # (op, slot) or a leaf's spec text -> unit input
    roots: dict[tuple[int, int], object] = {}  # node output -> the external input it aliases (views)
    nodes: list[dict] = []
    compute = 0
    for i in range(a, b):
        op = store.ops[i]
        why = _refusal(op)
        if why:
            return f"op {i} ({op['op']}) {why}"
        compute += not op["view"]
        reads = flow.get(i, {})
        srcs: list[list[int]] = []
        read_roots = []
        for p, spec in enumerate(iter_specs([op["args"], op["kwargs"]])):
            if spec.get("storage"):
                return f"op {i} ({op['op']}) reads raw storage (as_strided over a base): not a program input"
            made = reads.get(p)
            if made is not None and a <= made[0] < i:
                srcs.append([made[0] - a, made[1]])
                read_roots.append(roots.get(made))
                continue
            ident = made if made is not None else _leaf_id(spec)
            if ident not in external:
                external[ident] = len(inputs)
                inputs.append({k: v for k, v in spec.items() if k != "src"})
                first_read.append((i, p))
            srcs.append([-1, external[ident]])
            read_roots.append(ident)
        info = op_info_by_name(op["op"], op.get("library") or "")
        for m in info.mutated:
            pos = _position(op, m)
            if pos is not None and pos < len(read_roots) and read_roots[pos] is not None:
                return f"op {i} ({op['op']}) writes the module's input in place (a cache?): not a pure function"
        if op["view"] and read_roots and read_roots[0] is not None:
            for k in range(len(list(iter_specs(op["outputs"])))):
                roots[(i, k)] = read_roots[0]
        nodes.append(_node(op, srcs, rec["module"]))
    if not compute:
        return "only views inside (no compute)"
    spans = _escaping(store, a, b, last_reads, roots)
    outputs = [[i - a, k] for i, k in spans]
    if not outputs:
        return "nothing it computes is read after it"
    try:
        unit = UnitCall(rec["module"], rec["class"], rec["call"], inputs, nodes, outputs, layer)
        unit.calls  # noqa: B018 — every node through the allow-list now
    except OpRefused as e:
        return f"not a program: {e}"
    return unit, UnitSpan(layer, a, b, spans, first_read)


def _escaping(store: FixtureStore, a: int, b: int, last_reads: dict, roots: dict) -> list[tuple[int, int]]:
    """The values made in ``[a, b)`` that something after it reads or the model returns: the outputs."""
    returns = {r for r in store.graph.returns if r is not None}
    out = []
    for i in range(a, b):
        for k in range(len(list(iter_specs(store.ops[i]["outputs"])))):
            escapes = last_reads.get((i, k), -1) >= b or (i, k) in returns
            if escapes and roots.get((i, k)) is None:  # a view of an input is the input: nothing to compute
                out.append((i, k))
    return out


def _refusal(op: dict) -> str | None:
    try:
        info = op_info_by_name(op["op"], op.get("library") or "")
    except OpRefused as e:
        return f"is refused: {e}"
    # an uninitialized buffer (empty*) is written before it is read; a random draw would draw again
    if op["nondeterministic"] and not op["view"] and info.name.split(".")[1] not in UNINITIALIZED:
        return "draws random numbers: a compiled unit would draw again"
    if not only_tensors(op["outputs"]):
        return "returns a Python value (data-dependent): the module cannot be one program"
    if info.inplace_view:
        return "rewrites tensor metadata in place"
    if info.writes_unreturned:
        return "writes inputs it does not return"
    try:
        check_value([op["args"], op["kwargs"]])
    except ValueError as e:
        return f"has an argument that cannot be rebuilt: {e}"
    if "opaque" in str(op["args"]) or "opaque" in str(op["kwargs"]):
        return "has an argument that cannot be rebuilt (a Python object)"
    return None


def _leaf_id(spec: dict) -> str:
    """A tensor no op made (a weight, a model input): the same content in the same layout is one input."""
    return "leaf:" + repr(sorted((k, str(v)) for k, v in spec.items() if k != "src"))


def _position(op: dict, m: int | str) -> int | None:
    """The tensor-input position of mutated argument ``m`` (an index into args or a kwarg name)."""
    pos = 0
    for n, arg in enumerate(op["args"]):
        if m == n:
            return pos if isinstance(arg, dict) and "tensor" in arg else None
        pos += len(list(iter_specs(arg)))
    kw = op["kwargs"]["dict"]
    for name, arg in kw.items():
        if m == name:
            return pos if isinstance(arg, dict) and "tensor" in arg else None
        pos += len(list(iter_specs(arg)))
    return None


def _node(op: dict, srcs: list[list[int]], unit_module: str) -> dict:
    """The op's record as a unit node: each tensor spec gains its ``src``."""
    it = iter(srcs)

    def tag(value):
        if isinstance(value, list):
            return [tag(v) for v in value]
        if isinstance(value, dict):
            (kind, payload), = value.items()
            if kind == "tensor":
                return {"tensor": dict(payload, src=next(it))}
            if kind == "tuple":
                return {"tuple": tag(payload)}
            if kind == "dict":
                return {"dict": {k: tag(v) for k, v in payload.items()}}
        return value

    node = {"op": op["op"], "args": tag(op["args"]), "kwargs": tag(op["kwargs"]), "outputs": op["outputs"],
            "module": op["module"][len(unit_module):] if unit_module else op["module"]}  # relative (``UnitCall``)
    if op.get("library"):
        node["library"] = op["library"]
    return node


def unit_inputs(store: FixtureStore, unit: UnitCall) -> list[torch.Tensor]:
    """The unit's inputs as the reference produced them (its carved fixtures)."""
    return [store.load(spec) for spec in unit.inputs]


def carved_outputs(store: FixtureStore, span: UnitSpan) -> list[torch.Tensor]:
    """The reference's values of the unit's outputs, as a comparison reads them (only those slots, no copy)."""
    return [store.load(list(iter_specs(store.ops[i]["outputs"]))[k], read_only=True) for i, k in span.outputs]


def children_of(store: FixtureStore, layer: int) -> tuple[list[int], list[int]]:
    """A module call's child calls and its loose ops (inside it, in no child): the next level down."""
    a, b = store.layers[layer]["ops"]
    kids = [r["index"] for r in store.layers if r.get("parent") == layer and r["ops"][1] > r["ops"][0]]
    covered = set()
    for k in kids:
        covered.update(range(*store.layers[k]["ops"]))
    return kids, [i for i in range(a, b) if i not in covered]


@dataclass
class Units:
    """Every unit built from a store, by layer, with the reasons for those that could not be built."""

    store: FixtureStore
    built: dict[int, tuple[UnitCall, UnitSpan]] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)

    @cached_property
    def _last(self) -> dict:
        return _last_reads(self.store)

    def get(self, layer: int) -> tuple[UnitCall, UnitSpan] | str:
        if layer in self.built:
            return self.built[layer]
        if layer in self.refused:
            return self.refused[layer]
        made = build_unit(self.store, layer, self._last)
        if isinstance(made, str):
            self.refused[layer] = made
        else:
            self.built[layer] = made
        return made

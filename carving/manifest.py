"""The store manifest (schema 2): compact on disk, checked whole on load, schema 1's shape in memory.

Why compact: a generate loop reads every weight in every step and an activation is read
by several ops, so most tensor uses repeat; op names, module paths and source lines
repeat too. Schema 2 lists each distinct tensor use once (``uses``; encoded values say
``{"tensor": INDEX}``), each string once (``strings``), each op as one row
(``OP_COLUMNS``) and data-flow edges as one flat list of integers — about half the bytes
of schema 1, and less than half the time to encode, read and check.

Why check on load: a store is data someone else may have written. Every field is typed
(the dataclasses below, also published as ``schemas/store.schema.json``), every encoded
argument must be what the value codec writes, every tensor use must fit the bytes it
points at — each distinct use is checked once — so a malformed or resealed manifest is a
one-line ``StoreError`` naming the file, never a crash deep inside a replay. Schema 1
stores are still read (``manifest_v1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tapml.core import (
    MalformedValue,
    OpRefused,
    SchemaError,
    check_value,
    dtype_from_name,
    json_schema,
    resolve_op,
    validate,
)

from . import manifest_v1
from .manifest_v1 import ShardMeta, StepRecord, TensorMeta, check_manifest_v1, check_ref

__all__ = ["SCHEMA_VERSION", "OP_COLUMNS", "Manifest", "Table", "check_manifest", "read_manifest", "compact",
           "store_schema"]

SCHEMA_VERSION = 2
# one op row: the first 12 always, library and carved_index only when set (op, module, source, library: string indices)
OP_COLUMNS = ("seq", "op", "module", "call", "layer", "step", "source", "signature", "args", "kwargs", "outputs",
              "flags", "library", "carved_index")
VIEW, INPLACE, NONDETERMINISTIC = 1, 2, 4  # flags


@dataclass
class TensorUse(manifest_v1.TensorUse):
    """A tensor among a module call's inputs or outputs, with its pytree path."""

    tensor: int | None = None  # index into uses


@dataclass
class LayerRecord(manifest_v1.LayerRecord):
    """One module call: its inputs and outputs, and the ops it ran."""

    inputs: list[TensorUse] = field(default_factory=list)
    outputs: list[TensorUse] = field(default_factory=list)


@dataclass
class Manifest:
    """A fixture store's manifest.json (schema 2)."""

    schema: int
    created: str
    versions: dict[str, str]
    model: dict[str, Any]
    options: dict[str, Any]
    stats: dict[str, int]
    steps: list[StepRecord]
    strings: list[str]  # op names, module paths, source lines: each once, referred to by index
    uses: list[dict[str, Any]]  # each distinct tensor use once: key, dtype, shape, stride[, offset, exact, storage]
    ops: list[list[Any]]  # one row per op, OP_COLUMNS; tensors in args/kwargs/outputs as {"tensor": use index}
    layers: list[LayerRecord]
    tensors: dict[str, TensorMeta]
    shards: dict[str, ShardMeta]
    digest: str
    truncated: str | None = None
    rng_state: int | None = None  # the CPU generator's state when the carve began (a use index)
    edges: list[int] | None = None  # flat, 4 per edge: producer op, output slot, consumer op, input position
    outputs: list[list[int] | None] | None = None  # per model output tensor: [op, slot] that produced it
    flow: list[int] | None = None  # like edges, following tensor objects (views included): for replays
    returns: list[list[int] | None] | None = None  # per model output tensor: [op, slot] that returned it
    reference: dict[str, str] | None = None  # where the carve ran: name, device (cpu, cuda:0), description


def store_schema() -> dict:
    return json_schema(Manifest, title="tapml fixture store manifest",
                       schema_id="https://tapml.dev/schemas/store.schema.json")


# -- writing ----------------------------------------------------------------------------------------------------------
class Table:
    """Distinct values in first-seen order, with their indices."""

    def __init__(self) -> None:
        self.items: list = []
        self._index: dict = {}

    def __call__(self, key, item=None) -> int:
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.items)
            self.items.append(key if item is None else item)
        return i


def compact(manifest: dict) -> dict:
    """A manifest in memory's shape (ops and layers as records with their tensor refs inline) as schema 2."""
    strings, uses = Table(), Table()
    by_id: dict[int, int] = {}  # the tracer shares one ref dict among the uses of a tensor: found by identity first

    def use(ref: dict) -> int:
        i = by_id.get(id(ref))
        if i is None:
            key = (ref["key"], ref["dtype"], tuple(ref["shape"]), tuple(ref["stride"]), ref.get("offset", 0),
                   ref.get("exact", True), ref.get("storage", False))
            i = by_id[id(ref)] = uses(key, ref)
        return i

    def enc(value):
        if type(value) is list:
            return [enc(v) for v in value]
        if type(value) is dict:
            (kind, payload), = value.items()
            if kind == "tensor":
                return {"tensor": use(payload)}
            if kind == "tuple":
                return {"tuple": enc(payload)}
            if kind == "dict":
                return {"dict": {k: enc(v) for k, v in payload.items()}}
        return value

    ops = []
    for op in manifest["ops"]:
        row = [op["seq"], strings(op["op"]), strings(op["module"]), op["call"], op.get("layer"), op["step"],
               None if op.get("source") is None else strings(op["source"]), op["signature"], enc(op["args"]),
               enc(op["kwargs"]), enc(op["outputs"]),
               VIEW * op["view"] + INPLACE * op["inplace"] + NONDETERMINISTIC * op["nondeterministic"]]
        if op.get("library") or op.get("carved_index") is not None:
            row.append(strings(op["library"]) if op.get("library") else None)
        if op.get("carved_index") is not None:
            row.append(op["carved_index"])
        ops.append(row)
    layers = [dict(layer, inputs=[_use_of(u, use) for u in layer["inputs"]],
                   outputs=[_use_of(u, use) for u in layer["outputs"]]) for layer in manifest["layers"]]
    out = dict(manifest, ops=ops, layers=layers)
    if manifest.get("rng_state") is not None:
        out["rng_state"] = use(manifest["rng_state"])
    for name in ("edges", "flow"):
        if manifest.get(name) is not None:
            out[name] = [x for edge in manifest[name] for x in edge]
    out["strings"], out["uses"] = strings.items, uses.items
    return out


def _use_of(leaf: dict, use) -> dict:
    return dict(leaf, tensor=use(leaf["tensor"])) if leaf.get("tensor") is not None else leaf


# -- reading ----------------------------------------------------------------------------------------------------------
def check_manifest(obj: Any) -> None:
    """Raise ``ValueError`` (``SchemaError``/``MalformedValue``) naming the first problem."""
    read_manifest(obj)


def read_manifest(obj: Any) -> dict:
    """Check a manifest read from disk (schema 1 or 2) and return it in memory's shape (schema 1's records:
    ``ops`` and ``layers`` with their tensor refs inline, edges as ``[producer, slot, consumer, input]``).

    Raises ``ValueError`` (``SchemaError``/``MalformedValue``) naming the first problem."""
    if isinstance(obj, dict) and obj.get("schema") == 1:
        check_manifest_v1(obj)
        return obj
    # checked below without the generic walk, which costs ~10 us per record
    big = {"strings": [], "uses": [], "ops": [], "edges": None, "flow": None, "tensors": {}}
    validate(Manifest, {k: big.get(k, v) if k in big else v for k, v in obj.items()} if isinstance(obj, dict) else obj)
    tensors, shards = obj["tensors"], obj["shards"]
    _check_tensors(tensors, shards)
    strings = _list_of(obj["strings"], str, "strings")
    uses = _list_of(obj["uses"], dict, "uses")
    for i, ref in enumerate(uses):
        check_ref(ref, tensors, f"uses[{i}]")
    n_ops = len(_list_of(obj["ops"], list, "ops"))
    m = dict(obj, ops=_ops(obj["ops"], strings, uses, len(obj["steps"])))
    del m["strings"], m["uses"]
    if obj.get("rng_state") is not None:
        m["rng_state"] = uses[_index(obj["rng_state"], uses, "rng_state")]
    m["layers"] = []
    for i, layer in enumerate(obj["layers"]):
        first, end = (layer.get("ops") or [0, 0]) + [0, 0][len(layer.get("ops") or []):]
        if not 0 <= first <= end <= n_ops:
            raise MalformedValue(f"layers[{i}].ops: range {layer.get('ops')} is outside 0..{n_ops}")
        m["layers"].append(dict(layer, **{part: [_leaf(u, uses, f"layers[{i}].{part}") for u in layer.get(part, [])]
                                          for part in ("inputs", "outputs")}))
    for name in ("edges", "flow"):
        if obj.get(name) is not None:
            m[name] = _edges(obj[name], n_ops, name)
    for i, step in enumerate(obj["steps"]):
        if len(step["ops"]) != 2 or not 0 <= step["ops"][0] <= step["ops"][1] <= n_ops:
            raise MalformedValue(f"steps[{i}].ops: range {step['ops']} is outside 0..{n_ops}")
    return m


def _list_of(value, kind: type, where: str) -> list:
    if not isinstance(value, list) or not all(type(v) is kind for v in value):
        raise MalformedValue(f"{where}: expected a list of {kind.__name__}s")
    return value


def _int(x) -> bool:
    return type(x) is int


def _index(i, table: list, where: str) -> int:
    if type(i) is not int or not 0 <= i < len(table):
        raise MalformedValue(f"{where}: {str(i)[:40]!r} is not an index into {len(table)} entries")
    return i


_META = {"dtype": str, "numel": int, "nbytes": int, "shard": str}  # TensorMeta's fields (and an optional offset)


def _check_tensors(tensors, shards: dict) -> None:
    if not isinstance(tensors, dict):
        raise SchemaError("tensors: expected an object")
    for key, meta in tensors.items():
        if type(meta) is not dict:
            raise SchemaError(f"tensors.{key}: expected an object")
        for name, kind in _META.items():
            if name not in meta:
                raise SchemaError(f"tensors.{key}.{name}: missing")
            if type(meta[name]) is not kind:
                raise SchemaError(f"tensors.{key}.{name}: expected {'an integer' if kind is int else 'a string'}")
        if len(meta) > len(_META):
            unknown = [k for k in meta if k not in _META and k != "offset"]
            if unknown:
                raise SchemaError(f"tensors.{key}: unknown field {unknown[0]!r}")
            if meta.get("offset") is not None and type(meta["offset"]) is not int:
                raise SchemaError(f"tensors.{key}.offset: expected an integer")
        if (meta.get("offset") or 0) < 0 or meta["numel"] < 0:
            raise MalformedValue(f"tensors.{key}: negative offset or size")
        if meta["shard"] not in shards:
            raise MalformedValue(f"tensors.{key}: in unknown shard {meta['shard']!r}")
        if meta["nbytes"] != meta["numel"] * dtype_from_name(meta["dtype"]).itemsize:
            raise MalformedValue(f"tensors.{key}: {meta['numel']} {meta['dtype']} elements are not "
                                 f"{meta['nbytes']} bytes")


def _ops(rows: list, strings: list, uses: list, n_steps: int) -> list[dict]:
    n_uses = len(uses)

    def spec(payload, where: str) -> None:
        if type(payload) is not int or not 0 <= payload < n_uses:
            raise MalformedValue(f"{where}: tensor {str(payload)[:40]!r} is not an index into {n_uses} uses")

    def expand(value):
        if type(value) is list:
            return [expand(v) for v in value]
        if type(value) is dict:
            (kind, payload), = value.items()
            if kind == "tensor":
                return {"tensor": uses[payload]}
            if kind == "tuple":
                return {"tuple": expand(payload)}
            if kind == "dict":
                return {"dict": {k: expand(v) for k, v in payload.items()}}
        return value

    resolved: set[tuple] = set()
    ops = []
    for i, row in enumerate(rows):
        where = f"ops[{i}]"
        if not 12 <= len(row) <= 14:
            raise MalformedValue(f"{where}: {len(row)} fields, expected 12 to 14 ({', '.join(OP_COLUMNS)})")
        seq, op, module, call, layer, step, source, sig, args, kwargs, outputs, flags = row[:12]
        library = row[12] if len(row) > 12 else None
        carved = row[13] if len(row) > 13 else None
        if not (_int(seq) and _int(call) and _int(step) and _int(flags) and (layer is None or _int(layer))
                and (carved is None or _int(carved))):
            raise MalformedValue(f"{where}: seq, call, layer, step, flags and carved_index must be integers")
        name, path = strings[_index(op, strings, f"{where}.op")], strings[_index(module, strings, f"{where}.module")]
        source = None if source is None else strings[_index(source, strings, f"{where}.source")]
        library = None if library is None else strings[_index(library, strings, f"{where}.library")]
        if not isinstance(sig, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise MalformedValue(f"{where}: signature must be a string, args a list and kwargs an object")
        if (name, library) not in resolved:  # a store is data: every op it names must pass the allow-list
            try:
                resolve_op(name, library or "")
            except OpRefused as e:
                if e.kind != "namespace":  # an unknown library's op is refused where it would run
                    raise MalformedValue(f"{where}: {e}") from None
            resolved.add((name, library))
        if not 0 <= step < max(1, n_steps):
            raise MalformedValue(f"{where}: step {step} does not exist")
        check_value(args, f"{where}.args", spec=spec)
        check_value(kwargs, f"{where}.kwargs", spec=spec)
        check_value(outputs, f"{where}.outputs", spec=spec)
        rec = {"index": i, "seq": seq, "op": name, "module": path, "call": call, "layer": layer, "step": step,
               "source": source, "signature": sig, "args": expand(args), "kwargs": expand(kwargs),
               "outputs": expand(outputs), "view": bool(flags & VIEW), "inplace": bool(flags & INPLACE),
               "nondeterministic": bool(flags & NONDETERMINISTIC)}
        if library is not None:
            rec["library"] = library
        if carved is not None:
            rec["carved_index"] = carved
        ops.append(rec)
    return ops


def _leaf(leaf: dict, uses: list, where: str) -> dict:
    if leaf.get("tensor") is None:
        return leaf
    return dict(leaf, tensor=uses[_index(leaf["tensor"], uses, where)])


def _edges(flat, n_ops: int, name: str) -> list[list[int]]:
    if not isinstance(flat, list) or len(flat) % 4 or not all(type(x) is int for x in flat):
        raise MalformedValue(f"{name}: expected a flat list of integers, 4 per edge")
    edges = [flat[k:k + 4] for k in range(0, len(flat), 4)]
    for e in edges:
        if not 0 <= e[0] < e[2] < n_ops or e[1] < 0 or e[3] < 0:
            raise MalformedValue(f"edges: {e} is not [producer, slot, later consumer, input] of known ops")
    return edges

"""Schema 1 manifests (stores carved before the compact form): their shape, and checking one read from disk.

Schema 1 is also the shape a ``FixtureStore`` presents in memory (``store.ops`` are ``OpRecord``
dicts with their tensor refs inline), whatever the schema on disk. Why check on load: a store is
data someone else may have written; every encoded argument must be what the value codec writes and
every tensor use must fit the bytes it points at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tapml.core import (
    MalformedValue,
    OpRefused,
    broadcast_narrowed,
    check_spec,
    check_value,
    dtype_from_name,
    iter_specs,
    resolve_op,
    validate,
)

__all__ = ["ManifestV1", "OpRecord", "LayerRecord", "StepRecord", "TensorMeta", "ShardMeta", "check_ref",
           "check_manifest_v1"]


@dataclass
class StepRecord:
    """A named part of the carved run (``call 0``, ``prefill``, ``decode 3``)."""

    index: int
    name: str
    ops: list[int]  # [first, end) op indices


@dataclass
class TensorUse:
    """A tensor among a module call's inputs or outputs, with its pytree path."""

    path: str
    tensor: dict[str, Any] | None = None
    uncarved: str | None = None  # why the tensor is not stored (a sparse input, ...)


@dataclass
class LayerRecord:
    """One module call: its inputs and outputs, and the ops it ran."""

    index: int
    module: str
    class_: str = field(metadata={"json": "class"})
    call: int = 0
    step: int = 0
    ops: list[int] = field(default_factory=list)
    inputs: list[TensorUse] = field(default_factory=list)
    outputs: list[TensorUse] = field(default_factory=list)
    parent: int | None = None


@dataclass
class OpRecord:
    """One carved operator call."""

    index: int
    seq: int
    op: str
    module: str
    call: int
    step: int
    signature: str
    args: list[Any]
    kwargs: dict[str, Any]
    outputs: Any
    view: bool
    inplace: bool
    nondeterministic: bool
    layer: int | None = None
    source: str | None = None
    library: str | None = None  # the module that registers a non-aten op's namespace
    carved_index: int | None = None  # in an emitted subset store: the op's index in the original


@dataclass
class TensorMeta:
    """Where a stored tensor's bytes are."""

    dtype: str
    numel: int
    nbytes: int
    shard: str
    offset: int | None = None  # inside the shard's packed blob (small tensors)


@dataclass
class ShardMeta:
    bytes: int


@dataclass
class ManifestV1:
    """A schema 1 fixture store's manifest.json."""

    schema: int
    created: str
    versions: dict[str, str]
    model: dict[str, Any]
    options: dict[str, Any]
    stats: dict[str, int]
    steps: list[StepRecord]
    layers: list[LayerRecord]
    ops: list[OpRecord]
    tensors: dict[str, TensorMeta]
    shards: dict[str, ShardMeta]
    digest: str
    truncated: str | None = None
    rng_state: dict[str, Any] | None = None  # the CPU generator's state when the carve began (a tensor ref)
    edges: list[list[int]] | None = None  # [producer op, output slot, consumer op, input position]
    outputs: list[list[int] | None] | None = None  # per model output tensor: [op, slot] that produced it
    flow: list[list[int]] | None = None  # like edges, following tensor objects (views included): for replays
    returns: list[list[int] | None] | None = None  # per model output tensor: [op, slot] that returned it


_MAX_REBUILD = 1 << 28


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_ref(ref: dict, tensors: dict, where: str) -> None:
    check_spec(ref, where)
    key = ref.get("key")
    meta = tensors.get(key) if isinstance(key, str) else None
    if meta is None:
        raise MalformedValue(f"{where}: references unknown tensor {key!r}")
    shape, stride = ref["shape"], ref["stride"]
    # exact layouts are stored as their (broadcast-narrowed) elements in storage order, others logically
    narrow = broadcast_narrowed(shape, stride) if ref.get("exact", True) else shape
    needed = _numel(narrow)
    extent = ref.get("offset", 0) + 1 + sum((s - 1) * st for s, st in zip(narrow, stride, strict=True)) \
        if needed else 0
    if ref.get("storage"):  # a whole storage, viewed: the view must lie inside it
        if extent > meta["numel"]:
            raise MalformedValue(f"{where}: a view spanning {extent} elements of a {meta['numel']}-element storage")
        return
    if extent > max(64 * needed, _MAX_REBUILD):  # replay rebuilds the exact layout in a buffer this big
        raise MalformedValue(f"{where}: its strides and offset span {extent} elements for {needed} stored ones")
    if meta["numel"] != needed:
        raise MalformedValue(f"{where}: shape {shape} needs {needed} stored elements but tensor {key} holds "
                             f"{meta['numel']}")
    if dtype_from_name(ref["dtype"]).itemsize != dtype_from_name(meta["dtype"]).itemsize:
        raise MalformedValue(f"{where}: dtype {ref['dtype']} does not match the stored {meta['dtype']}")


def check_manifest_v1(obj: Any) -> None:
    """Raise ``ValueError`` (``SchemaError``/``MalformedValue``) naming the first problem."""
    validate(ManifestV1, obj)
    tensors, shards = obj["tensors"], obj["shards"]
    for key, meta in tensors.items():
        if (meta.get("offset") or 0) < 0 or meta["numel"] < 0:
            raise MalformedValue(f"tensors.{key}: negative offset or size")
        if meta["shard"] not in shards:
            raise MalformedValue(f"tensors.{key}: in unknown shard {meta['shard']!r}")
        dtype = dtype_from_name(meta["dtype"])
        if meta["numel"] < 0 or meta["nbytes"] != meta["numel"] * dtype.itemsize:
            raise MalformedValue(f"tensors.{key}: {meta['numel']} {meta['dtype']} elements are not "
                                 f"{meta['nbytes']} bytes")
    if obj.get("rng_state") is not None:
        check_ref(obj["rng_state"], tensors, "rng_state")
    n_ops = len(obj["ops"])
    names: set[str] = set()
    for i, rec in enumerate(obj["ops"]):
        where = f"ops[{i}]"
        if rec["index"] != i:
            raise MalformedValue(f"{where}: index {rec['index']} out of order")
        if rec["op"] not in names:  # a store is data: every op it names must pass the allow-list
            try:
                resolve_op(rec["op"], rec.get("library") or "")
            except OpRefused as e:
                if e.kind != "namespace":  # an unknown library's op is refused where it would run
                    raise MalformedValue(f"{where}: {e}") from None
            names.add(rec["op"])
        if not 0 <= rec["step"] < max(1, len(obj["steps"])):
            raise MalformedValue(f"{where}: step {rec['step']} does not exist")
        for part in ("args", "kwargs", "outputs"):
            check_value(rec[part], f"{where}.{part}")
            for ref in iter_specs(rec[part]):
                check_ref(ref, tensors, f"{where}.{part}")
    for i, layer in enumerate(obj["layers"]):
        for part in ("inputs", "outputs"):
            for use in layer.get(part, []):
                if use.get("tensor") is not None:
                    check_ref(use["tensor"], tensors, f"layers[{i}].{part}")
        first, end = (layer.get("ops") or [0, 0]) + [0, 0][len(layer.get("ops") or []):]
        if not 0 <= first <= end <= n_ops:
            raise MalformedValue(f"layers[{i}].ops: range {layer.get('ops')} is outside 0..{n_ops}")
    for e in (obj.get("edges") or []) + (obj.get("flow") or []):
        if len(e) != 4 or not 0 <= e[0] < e[2] < n_ops or e[1] < 0 or e[3] < 0:
            raise MalformedValue(f"edges: {e} is not [producer, slot, later consumer, input] of known ops")
    for i, step in enumerate(obj["steps"]):
        if len(step["ops"]) != 2 or not 0 <= step["ops"][0] <= step["ops"][1] <= n_ops:
            raise MalformedValue(f"steps[{i}].ops: range {step['ops']} is outside 0..{n_ops}")


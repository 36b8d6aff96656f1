"""Operator identity: a recorded op name resolved to an ``OpOverload`` safely, and what its schema says.

Why an allow-list: op names arrive from the wire and from stores someone else
carved. A ``getattr`` chain on ``torch.ops`` would reach ``aten.from_file``
(reads any file), ``load_library`` (loads native code) and friends. A name
resolves only when it is a registered overload of an allow-listed namespace
and its schema touches nothing outside tensors; in-place and alias facts come
from that schema, never from whoever sent the name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import torch

from .errors import OpRefused

__all__ = ["OpInfo", "op_info", "op_info_by_name", "resolve_op", "remote_refusal", "allow_namespace",
           "ALLOWED_NAMESPACES", "DENIED_OPS", "UNINITIALIZED"]

ALLOWED_NAMESPACES = frozenset({"aten", "prims"})
# side effects outside tensors: files, the console, streams, raw storages
DENIED_OPS = frozenset({
    "aten.from_file", "aten._print", "aten.record_stream", "aten.set", "aten._make_dep_token",
    "aten._linalg_check_errors", "aten.sym_constrain_range", "aten._assert_scalar",
})
UNINITIALIZED = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted"})
_DENIED_TYPES = ("Storage", "Stream", "Any", "__torch__", "Capsule", "Future", "Await", "Object")
_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_extra_namespaces: set[str] = set()


def allow_namespace(namespace: str) -> None:
    """Let ops of ``namespace`` resolve (a platform or a carved module that registers its own ops)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", namespace) or namespace.startswith("_"):
        raise OpRefused(f"namespace {namespace!r} is not a valid operator namespace")
    _extra_namespaces.add(namespace)


@cache
def _registered() -> frozenset[str]:
    return frozenset(torch._C._dispatch_get_all_op_names())


def _is_registered(namespace: str, op: str, overload: str) -> bool:
    qualified = f"{namespace}::{op}"
    names = _registered()
    if (qualified in names if overload == "default" else f"{qualified}.{overload}" in names):
        return True
    _registered.cache_clear()  # an op registered since (a library imported later)
    names = _registered()
    return qualified in names if overload == "default" else f"{qualified}.{overload}" in names


def resolve_op(name: str) -> torch._ops.OpOverload:
    """``"aten.addmm.default"`` → ``torch.ops.aten.addmm.default``, or ``OpRefused`` saying why not."""
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise OpRefused(f"op name {name!r} is not NAMESPACE.OP.OVERLOAD")
    namespace, op, overload = match.groups()
    if namespace not in ALLOWED_NAMESPACES and namespace not in _extra_namespaces:
        raise OpRefused(f"op {name}: namespace {namespace!r} is not allow-listed "
                        f"({', '.join(sorted(ALLOWED_NAMESPACES | _extra_namespaces))})")
    if op.startswith("__") or overload.startswith("__"):
        raise OpRefused(f"op {name}: not an operator name")
    if f"{namespace}.{op}" in DENIED_OPS:
        raise OpRefused(f"op {name} has side effects outside tensors (files, console, streams): refused")
    if not _is_registered(namespace, op, overload):
        raise OpRefused(f"op {name} is not a registered operator overload")
    packet = getattr(getattr(torch.ops, namespace), op)
    resolved = getattr(packet, overload, None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    if not isinstance(resolved, torch._ops.OpOverload) or str(resolved) != name:
        raise OpRefused(f"op {name} is not a registered operator overload")
    bad = [a.name for a in resolved._schema.arguments if any(t in str(a.type) for t in _DENIED_TYPES)]
    if bad:
        raise OpRefused(f"op {name} takes {', '.join(bad)} (not tensor data): refused")
    return resolved


@dataclass(frozen=True)
class OpInfo:
    """What the schema says about an overload, computed once per overload."""

    name: str
    mutated: tuple[int | str, ...]  # positions/names of arguments written in place
    view: bool
    nondeterministic: bool  # random (seeded) or uninitialized output
    outputs: tuple[str, ...]  # return names where the schema gives them ("" otherwise)
    inplace_view: bool = False

    @property
    def inplace(self) -> bool:
        return bool(self.mutated)

    def output_name(self, i: int) -> str:
        return self.outputs[i] if i < len(self.outputs) else ""


_INFO: dict[object, OpInfo] = {}


def op_info(func: torch._ops.OpOverload) -> OpInfo:
    info = _INFO.get(func)
    if info is None:
        schema = func._schema
        mutated = tuple(
            (a.name if a.kwarg_only else i)
            for i, a in enumerate(schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        )
        view = not mutated and any(r.alias_info is not None for r in schema.returns)
        nondet = torch.Tag.nondeterministic_seeded in func.tags or func._opname in UNINITIALIZED
        info = _INFO[func] = OpInfo(str(func), mutated, view, nondet, tuple(r.name or "" for r in schema.returns),
                                    torch.Tag.inplace_view in func.tags)
    return info


def op_info_by_name(name: str) -> OpInfo:
    return op_info(resolve_op(name))


def remote_refusal(name: str) -> str | None:
    """Why a worker must not run this op for a client (beyond ``resolve_op``'s rules), or None.

    Random ops change the worker's RNG state, uninitialized outputs would disclose
    its memory, and in-place view ops rewrite tensor metadata it holds."""
    info = op_info_by_name(name)
    func = resolve_op(name)
    if torch.Tag.nondeterministic_seeded in func.tags:
        return f"{name} draws random numbers (changes the worker's RNG state): stays on the reference"
    if func._opname in UNINITIALIZED:
        return f"{name} returns uninitialized memory (could disclose the worker's memory): stays on the reference"
    if info.inplace_view:
        return f"{name} rewrites tensor metadata in place: stays on the reference"
    return None

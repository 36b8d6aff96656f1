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

__all__ = ["UNDECLARED_WRITES", "bump_undeclared", "OpInfo", "op_info", "op_info_by_name", "resolve_op",
           "remote_refusal", "allow_namespace", "load_library",
           "library_of", "ALLOWED_NAMESPACES", "DENIED_OPS", "UNINITIALIZED", "TRUSTED_LIBRARIES"]

ALLOWED_NAMESPACES = frozenset({"aten", "prims"})
# side effects outside tensors: files, the console, streams, raw storages
DENIED_OPS = frozenset({
    "aten.from_file", "aten._print", "aten.record_stream", "aten.set", "aten._make_dep_token",
})
# Legacy schemas that write arguments without saying so (``(a!)``): batch norm's running statistics in
# training mode. Treated as declared writes; version counters are bumped by hand after them (ATen does not).
UNDECLARED_WRITES = {"aten.native_batch_norm": (3, 4), "aten.cudnn_batch_norm": (3, 4),
                     "aten.miopen_batch_norm": (3, 4), "aten._batch_norm_impl_index": (3, 4)}
UNINITIALIZED = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted",
                           "_ctc_loss"})  # _ctc_loss leaves part of its log_alpha output unwritten
_DENIED_TYPES = ("Storage", "Stream", "Any", "__torch__", "Capsule", "Future", "Await", "Object")
_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_extra_namespaces: set[str] = set()
# Python modules that may be imported to register an op namespace a store or a client names: parts of the
# installed PyTorch distribution, which register ops on import and do nothing else
TRUSTED_LIBRARIES = ("torch.", "torchvision.", "torchaudio.")


def library_of(func: torch._ops.OpOverload) -> str | None:
    """The Python module that registered a custom op (``torch.library.custom_op``), when known."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:
        return None
    definition = OPDEFS.get(f"{func.namespace}::{func._schema.name.split('::', 1)[-1]}")
    init = getattr(definition, "_init_fn", None)
    return getattr(init, "__module__", None)


def load_library(namespace: str, module: str | None) -> None:
    """Make ``namespace`` resolvable by importing the module that registers it — only a trusted one.

    A store or a client names the module; importing code is only ever done for modules of the
    installed PyTorch distribution (``TRUSTED_LIBRARIES``); anything else is refused with its name."""
    if namespace in ALLOWED_NAMESPACES or namespace in _extra_namespaces:
        return
    if not module:
        raise OpRefused(f"namespace {namespace!r} is registered by a Python module tapml does not know "
                        "(not a torch.library.custom_op): its ops stay on the reference", "namespace")
    if not isinstance(module, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", module) or \
            not module.startswith(TRUSTED_LIBRARIES):
        raise OpRefused(f"namespace {namespace!r} is registered by module {module!r}, which is not a trusted "
                        f"library ({', '.join(p + '*' for p in TRUSTED_LIBRARIES)}): its ops stay on the reference",
                        "namespace")
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise OpRefused(f"namespace {namespace!r}: module {module} cannot be imported here ({e})", "namespace") \
            from None
    if not any(n.startswith(f"{namespace}::") for n in torch._C._dispatch_get_all_op_names()):
        raise OpRefused(f"module {module} did not register namespace {namespace!r}", "namespace")
    _registered.cache_clear()
    _extra_namespaces.add(namespace)


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


def resolve_op(name: str, library: str | None = None) -> torch._ops.OpOverload:
    """``"aten.addmm.default"`` → ``torch.ops.aten.addmm.default``, or ``OpRefused`` saying why not.

    ``library``: the module a store or client says registers the op's namespace (imported only
    when trusted, see ``load_library``). Built-in resolutions are remembered (the engine asks per op per
    step); refusals are not."""
    key = (name, library) if isinstance(name, str) and (library is None or isinstance(library, str)) else None
    hit = _resolved.get(key) if key is not None else None
    if hit is not None:
        return hit
    resolved = _resolve(name, library)
    if key is not None and name.startswith(("aten.", "prims.")) and len(_resolved) < 65536:  # not custom ops,
        # which a test or a library may unregister
        _resolved[key] = resolved
    return resolved


_resolved: dict[tuple[str, str | None], torch._ops.OpOverload] = {}


def _resolve(name: str, library: str | None) -> torch._ops.OpOverload:
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise OpRefused(f"op name {name!r} is not NAMESPACE.OP.OVERLOAD")
    namespace, op, overload = match.groups()
    if library is not None and namespace not in ALLOWED_NAMESPACES and namespace not in _extra_namespaces:
        load_library(namespace, library)
    if namespace not in ALLOWED_NAMESPACES and namespace not in _extra_namespaces:
        raise OpRefused(f"op {name}: namespace {namespace!r} is not allow-listed "
                        f"({', '.join(sorted(ALLOWED_NAMESPACES | _extra_namespaces))})", "namespace")
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
    returned: tuple[int | str | None, ...] = ()  # per return: the mutated argument it aliases, or None
    undeclared: tuple[int, ...] = ()  # arguments written without an (a!) in the schema

    @property
    def writes_unreturned(self) -> bool:
        """Some argument is written but not returned: a target's new values for it would be lost."""
        return any(m not in self.returned for m in self.mutated)

    @property
    def inplace(self) -> bool:
        return bool(self.mutated)

    def output_name(self, i: int) -> str:
        return self.outputs[i] if i < len(self.outputs) else ""


_INFO: dict[object, OpInfo] = {}
# what the schema leaves unnamed: how a message should call each output
_OUTPUT_NAMES = {
    "native_layer_norm": ("output", "mean", "rstd"), "native_group_norm": ("output", "mean", "rstd"),
    "native_batch_norm": ("output", "save_mean", "save_invstd"),
    "_native_batch_norm_legit": ("output", "save_mean", "save_invstd"),
    "_native_batch_norm_legit_no_training": ("output", "save_mean", "save_invstd"),
    "max_pool2d_with_indices": ("output", "indices"), "max_pool3d_with_indices": ("output", "indices"),
    "var_mean": ("var", "mean"), "std_mean": ("std", "mean"), "_ctc_loss": ("neg_log_likelihood", "log_alpha"),
    "_scaled_dot_product_flash_attention_for_cpu": ("output", "logsumexp"),
}


def op_info(func: torch._ops.OpOverload) -> OpInfo:
    info = _INFO.get(func)
    if info is None:
        schema = func._schema
        writers = {}  # alias set -> the argument written through it
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                writers[tuple(sorted(a.alias_info.before_set))] = a.name if a.kwarg_only else i
        undeclared = UNDECLARED_WRITES.get(f"{func.namespace}.{func._opname}", ())
        mutated = tuple(writers.values()) + tuple(i for i in undeclared if i not in writers.values())
        view = not writers and any(r.alias_info is not None for r in schema.returns)
        returned = tuple(writers.get(tuple(sorted(r.alias_info.before_set))) if r.alias_info is not None else None
                         for r in schema.returns)
        nondet = torch.Tag.nondeterministic_seeded in func.tags or func._opname in UNINITIALIZED
        names = tuple(r.name or "" for r in schema.returns)
        if not any(names):
            names = _OUTPUT_NAMES.get(func._opname, names)
        info = _INFO[func] = OpInfo(str(func), mutated, view, nondet, names, torch.Tag.inplace_view in func.tags,
                                    returned, undeclared)
    return info


def bump_undeclared(info: OpInfo, args, kwargs) -> None:
    """After an op that writes arguments without saying so: bump their version counters, so every
    hash memo keyed on (storage, version) sees the write (ATen bumps only for declared writes)."""
    for i in info.undeclared:
        t = args[i] if i < len(args) else None
        if isinstance(t, torch.Tensor) and not t.is_inference():
            torch.autograd.graph.increment_version(t)


def op_info_by_name(name: str, library: str | None = None) -> OpInfo:
    return op_info(resolve_op(name, library))


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

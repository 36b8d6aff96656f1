"""The tensors in a module call's arguments or outputs, with their pytree paths (``['args'][0]``).

Why not always ``tree_flatten_with_path``: every module call of a carve asks this, and for plain
tuples, lists and dicts of tensors pytree's generality costs more than the module's own hooks.
Anything else (a ``ModelOutput``, a cache object, a named tuple) goes to pytree, which knows them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path

__all__ = ["leaf_paths"]

_PLAIN = (type(None), int, float, bool, str)


class _NotPlain(Exception):
    pass


def _walk(value: Any, path: str, out: list) -> None:
    tp = type(value)
    if isinstance(value, torch.Tensor):
        out.append((path, value))
    elif tp is tuple or tp is list:
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]", out)
    elif tp is dict:
        for k, v in value.items():
            _walk(v, f"{path}[{k!r}]", out)
    elif tp not in _PLAIN:
        raise _NotPlain


def leaf_paths(tree: Any) -> list[tuple[str, torch.Tensor]]:
    """``(keystr path, tensor)`` for every tensor leaf of ``tree``, as ``tree_flatten_with_path`` gives them."""
    if isinstance(tree, torch.Tensor):
        return [("", tree)]
    out: list = []
    try:
        _walk(tree, "", out)
    except _NotPlain:
        leaves, _ = tree_flatten_with_path(tree)
        return [(keystr(p), v) for p, v in leaves if isinstance(v, torch.Tensor)]
    return out

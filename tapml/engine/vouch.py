"""The carved outputs a judge compares a target's outputs against, read only where needed.

Why: a worker hashes every output it sends (the content key it keeps it under), and the carve
names every output by the same key. An output whose key, dtype, shape and contiguous layout are
the carved use's holds exactly the carved bytes, so it can stand for its carved self: a bit-exact
target's outputs are judged without reading the store (on a first forward that read was most of
the comparison's cost; at scale it is a second copy of the largest outputs), and the comparison
of one tensor with itself is exact unless it holds a NaN (``judging.compare``).
"""

from __future__ import annotations

import torch

from tapml.carving import FixtureStore, TensorRef
from tapml.core import mark_content
from tapml.platforms import Target

__all__ = ["carved_for", "vouched"]


def carved_for(store: FixtureStore, index: int, got: list[torch.Tensor], target: Target) -> list[torch.Tensor]:
    """Op ``index``'s carved outputs (read only) for judging ``got``: see ``vouched``."""
    return vouched(store, store.output_refs(index), got, target)


def vouched(store: FixtureStore, refs: list[TensorRef], got: list[torch.Tensor], target: Target
            ) -> list[torch.Tensor]:
    """The carved uses ``refs`` (read only) for judging ``got``: each output the target vouches for by its
    content key in place of its carved self, marked as that content; the others read from the store."""
    if len(refs) != len(got):
        return [store.load(ref, read_only=True) for ref in refs]
    key = target.content_key
    return [mark_content(g, ref) if ref.held_by(g, key(g)) else store.load(ref, read_only=True)
            for g, ref in zip(got, refs, strict=True)]

"""Offload plans: which carved ops run on the target in each migration step.

``layers`` (default) finds the model's repeated blocks (``encoder.layer.N``,
``model.layers.N``: numbered children of one container) and migrates them
cumulatively, with the parts before and after them as their own steps;
``single`` moves one group at a time; ``ops`` one op type at a time; ``all``
everything at once; ``top-down`` (``topdown.py``) moves whole module calls compiled as units.
"""

from __future__ import annotations

import re
from collections import Counter

from tapml.carving import FixtureStore
from tapml.core import TapmlError

__all__ = ["PLANS", "find_blocks", "groups_for", "make_plan"]

PLANS = ("layers", "top-down", "single", "ops", "all")  # top-down: ``topdown.py`` (it needs the target)
_NUMBERED = re.compile(r"^(.*?)\.?(\d+)$")


def find_blocks(store: FixtureStore, pattern: str | None = None) -> list[str]:
    """Module paths of the repeated blocks, in call order."""
    paths = list(dict.fromkeys(layer["module"] for layer in store.layers))
    if pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise TapmlError(f"--layers {pattern!r} is not a valid regex: {e}") from None
        chosen = [p for p in paths if rx.fullmatch(p)]
        # keep the outermost matches only
        return [p for p in chosen if not any(p != q and p.startswith(q + ".") for q in chosen)]
    return _heaviest_families(paths, [op["module"] for op in store.ops])


def _heaviest_families(paths: list[str], op_modules: list[str]) -> list[str]:
    """Numbered siblings (``layers.0``, ``layers.1``, ...) form a family, weighed by the ops inside its members:
    the heaviest family is the repeated block, and so is every other family at least half as heavy and not
    nested in a chosen one (an encoder's and a decoder's layers). By weight, not by member count: two norms
    beside two attention layers are not the model's blocks."""
    family: dict[str, str] = {}
    for p in paths:
        m = _NUMBERED.match(p)
        if m and p:
            family[p] = m.group(1)
    members = Counter(family.values())
    weight: Counter = Counter()
    for module in op_modules:
        parts = module.split(".")
        for depth in range(len(parts), 0, -1):
            f = family.get(".".join(parts[:depth]))
            if f is not None and members[f] >= 2:
                weight[f] += 1
    ranked = sorted((f for f in members if members[f] >= 2), key=lambda f: (-weight[f], len(f), f))
    of = {f: [p for p in paths if family.get(p) == f] for f in ranked}
    chosen: list[str] = []
    for f in ranked:
        nested = any(_inside(a, b) or _inside(b, a) for c in chosen for a in of[f] for b in of[c])
        if not nested and (not chosen or 2 * weight[f] >= weight[chosen[0]]):
            chosen.append(f)
    return [p for p in paths if family.get(p) in chosen]


def _inside(module: str, block: str) -> bool:
    return module == block or module.startswith(block + ".")


def groups_for(store: FixtureStore, plan: str, layers: str | None = None) -> list[tuple[str, list[int]]]:
    """Named groups of op indices, in execution order."""
    ops = store.ops
    if plan == "ops":
        order = list(dict.fromkeys(op["op"] for op in ops))
        return [(name, [op["index"] for op in ops if op["op"] == name]) for name in order]
    blocks = find_blocks(store, layers)
    if not blocks:
        return [("model", [op["index"] for op in ops])]
    owner = {}
    for op in ops:
        owner[op["index"]] = next((b for b in blocks if _inside(op["module"], b)), None)
    first = min(op["index"] for op in ops if owner[op["index"]] is not None)
    before = [i for i, b in owner.items() if b is None and i < first]
    after = [i for i, b in owner.items() if b is None and i >= first]
    groups = [("before " + blocks[0], before)] if before else []
    groups += [(b, [i for i, o in owner.items() if o == b]) for b in blocks]
    if after:
        groups.append(("after " + blocks[-1], after))
    return groups


def make_plan(store: FixtureStore, plan: str, layers: str | None = None) -> list[dict]:
    """Migration steps: ``{"name", "groups", "offload": [op indices]}``."""
    if plan not in PLANS or plan == "top-down":
        raise TapmlError(f"unknown plan {plan!r} (choose from {', '.join(PLANS)})")
    groups = groups_for(store, plan, layers)
    if plan == "all":
        return [{"name": "all", "groups": [g for g, _ in groups], "offload": [i for _, ix in groups for i in ix]}]
    steps, cumulative = [], []
    for name, indices in groups:
        if plan == "layers":
            cumulative = cumulative + indices
            steps.append({"name": f"+ {name}", "groups": [g for g, _ in groups[:len(steps) + 1]],
                          "offload": list(cumulative)})
        else:
            steps.append({"name": name, "groups": [name], "offload": list(indices)})
    return steps

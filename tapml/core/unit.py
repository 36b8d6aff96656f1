"""``UnitCall``: a module call as one program — the carved ops inside it, wired by data flow.

Why the carved ops and not ``torch.export`` of the module on the client: the carve
already holds exactly the kernels that ran inside the module call, with their
data flow, so every module of any eager model is a program (cache objects, data-
dependent control flow and Python-created constants included), and the program
crosses the wire as the same validated JSON as an op — no pickle, no code. The
platform rebuilds it as a ``torch.fx`` graph of allow-listed ``OpOverload``s, and
a compiler re-exports and compiles that graph as one unit (fusion, layouts and
all). Parameters and buffers are plain inputs (they travel once, by content key).

In the encoded arguments, each tensor's spec carries ``"src"``: ``[j, k]`` for
output ``k`` of node ``j`` of this unit, ``[-1, p]`` for the unit's input ``p``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .errors import OpRefused
from .opcall import OpCall, _strip
from .tensors import TensorSpec
from .values import MalformedValue, check_spec, iter_specs

__all__ = ["UnitCall"]


@dataclass(frozen=True)
class UnitCall:
    """What to compile and run as one unit: its inputs' specs, its nodes (op calls), which values it returns."""

    module: str
    cls: str
    call: int
    inputs: list[dict]  # tensor specs (dtype/shape/stride, and the carved content key)
    nodes: list[dict]  # {"op", "args", "kwargs", "outputs", "library"?}: tensors carry "src"
    outputs: list[list[int]]  # [j, k] (node j's output k) or [-1, p] (input p passed through)
    index: int = -1  # the module call's index among the carved layers

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, list) or not isinstance(self.nodes, list) or not isinstance(self.outputs, list):
            raise OpRefused("a unit needs lists of inputs, nodes and outputs")
        try:
            for i, spec in enumerate(self.inputs):
                check_spec(spec, f"unit input {i}")
        except MalformedValue as e:
            raise OpRefused(f"unit {self.module}: {e}") from None
        for j, call in enumerate(self.calls):
            for spec in iter_specs([call.args, call.kwargs]):
                self._check_src(spec.get("src"), j, f"node {j} ({call.op})")
        for ref in self.outputs:
            self._check_src(ref, len(self.nodes), "an output")

    def _check_src(self, src: Any, before: int, where: str) -> None:
        ok = isinstance(src, list) and len(src) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                              for x in src)
        if ok and src[0] == -1:
            ok = 0 <= src[1] < len(self.inputs)
        elif ok:
            ok = 0 <= src[0] < before and 0 <= src[1] < len(self.calls[src[0]].output_specs)
        if not ok:
            raise OpRefused(f"unit {self.module}: {where} refers to {src!r}, which is not an input or an earlier "
                            "node's output")

    @cached_property
    def calls(self) -> list[OpCall]:
        """The nodes as validated op calls (the allow-list applies to every one)."""
        out = []
        for j, n in enumerate(self.nodes):
            if not isinstance(n, dict):
                raise OpRefused(f"unit {self.module}: node {j} is not an object")
            # where the op ran, relative to the unit's module: the same program serves every call of a
            # repeated block, each naming its own modules
            rel = n.get("module") if isinstance(n.get("module"), str) else ""
            module = self.module + rel if self.module else rel.lstrip(".")
            out.append(OpCall.from_json(dict(n, module=module, index=j)))
        return out

    @cached_property
    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(s) for s in self.inputs]

    @cached_property
    def output_specs(self) -> list[TensorSpec]:
        out = []
        for j, k in self.outputs:
            out.append(self.input_specs[k] if j == -1 else self.calls[j].output_specs[k])
        return out

    @cached_property
    def signature(self) -> str:
        """What a compiled unit depends on: its nodes, input dtypes/shapes/strides, returned values."""
        text = json.dumps([[_strip(n.get("args")), _strip(n.get("kwargs")), n.get("op")] for n in self.nodes] +
                          [[{k: v for k, v in s.items() if k not in ("key", "offset", "exact")} for s in self.inputs],
                           self.outputs], separators=(",", ":"), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def rebind(self, module: str, call: int, index: int) -> UnitCall:
        """The same program as another call of it (a repeated block): its module path, call and index."""
        return UnitCall(module, self.cls, call, self.inputs, self.nodes, self.outputs, index)

    def to_json(self) -> dict:
        return {"module": self.module, "cls": self.cls, "call": self.call, "inputs": self.inputs,
                "nodes": self.nodes, "outputs": self.outputs, "index": self.index}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, obj: Any) -> UnitCall:
        """Build from untrusted JSON; anything malformed is ``OpRefused``."""
        keys = ("module", "cls", "call", "inputs", "nodes", "outputs")
        if not isinstance(obj, dict) or not all(k in obj for k in keys):
            raise OpRefused("a unit must be an object with module, cls, call, inputs, nodes and outputs")
        if not all(isinstance(obj[k], str) for k in ("module", "cls")) or not isinstance(obj["call"], int):
            raise OpRefused("a unit's module and class are strings and its call an integer")
        unit = cls(obj["module"], obj["cls"], obj["call"], obj["inputs"], obj["nodes"], obj["outputs"],
                   obj.get("index", -1) if isinstance(obj.get("index", -1), int) else -1)
        unit.calls  # noqa: B018 — validate every node now
        return unit

    @classmethod
    def loads(cls, text: str) -> UnitCall:
        try:
            obj = json.loads(text)
        except (TypeError, ValueError, RecursionError) as e:
            raise OpRefused(f"a unit is not JSON: {e}") from None
        return cls.from_json(obj)

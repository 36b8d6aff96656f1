"""Built-in workloads, named ``zoo:NAME``. Imported lazily: transformers is slow to load."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from tapml.core import TapmlError

from .workload import Workload

__all__ = ["Workload", "ZooEntry", "ZOO", "zoo_factory"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: str  # "module:function" inside tapml.zoo
    description: str
    generate: bool = False
    arg: str | None = None  # passed to the factory (one factory serving many entries)
    family: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "spec": f"zoo:{self.name}", "description": self.description,
                "generate": self.generate, "family": self.family}


def _entries() -> list[ZooEntry]:
    from .hf import ARCHS
    from .seeds import SEEDS

    entries = [
        ZooEntry("minilm", "minilm:build",
                 "trained all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers) on real sentences", family="trained"),
        ZooEntry("tiny-llama", "tiny_llama:build",
                 "small Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU), seeded weights; "
                 "--generate N carves prefill + decode steps", generate=True, family="decoder"),
    ]
    entries += [ZooEntry(name, "seeds:build", description, generate=gen, arg=name, family="seed workload")
                for name, (description, gen) in SEEDS.items()]
    entries += [ZooEntry(name, "hf:build", f"tiny random transformers {arch.model} ({arch.family})",
                         generate=arch.generate, arg=name, family=arch.family) for name, arch in ARCHS.items()]
    return entries


ZOO: dict[str, ZooEntry] = {e.name: e for e in _entries()}


def zoo_factory(name: str) -> Callable[[], object]:
    entry = ZOO.get(name)
    if entry is None:
        raise TapmlError(f"no zoo workload {name!r}; `tapml zoo` lists them ({', '.join(ZOO)})")
    module, func = entry.factory.split(":")
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ImportError as e:
        raise TapmlError(f"zoo:{name} needs an extra package ({e.name}); install tapml[zoo]") from e
    factory = getattr(mod, func)
    return functools.partial(factory, entry.arg) if entry.arg is not None else factory

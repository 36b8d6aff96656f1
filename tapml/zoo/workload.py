"""``Workload``: a model, the inputs it runs on, and optionally a generation loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tapml.core import TapmlError

__all__ = ["Workload"]


@dataclass
class Workload:
    """A model, the inputs it is run on, and optionally a generation loop."""

    model: torch.nn.Module
    inputs: Any
    name: str = ""
    description: str = ""
    generate: Callable[[int], Any] | None = None  # generate(n_tokens): prefill + decode steps

    def run(self, generate: int | None = None) -> Any:
        """One eager run: a forward on the inputs, or ``generate(n)`` when asked."""
        if generate is not None:
            if self.generate is None:
                raise TapmlError(f"{self.name or 'this model'} has no generate entry; drop --generate")
            return self.generate(generate)
        if isinstance(self.inputs, dict):
            return self.model(**self.inputs)
        if isinstance(self.inputs, tuple):
            return self.model(*self.inputs)
        return self.model(self.inputs)

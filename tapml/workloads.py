"""Resolve a model spec (``zoo:NAME``, ``FILE.py:factory``, ``pkg.module:factory``) to a workload.

The factory contract: a zero-argument callable returning either a ``Workload`` or
a pair ``(model, inputs)``, where ``inputs`` is a tuple of positional arguments,
a dict of keyword arguments, or a single tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import TapmlError

__all__ = ["Workload", "load_workload"]


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


def _import_factory(spec: str) -> Callable[[], Any]:
    from .platforms import PlatformError, import_object

    if ":" not in spec:
        raise TapmlError(f"model spec {spec!r} is not zoo:NAME, FILE.py:factory or pkg.module:factory")
    try:
        factory = import_object(spec, "model")
    except PlatformError as e:
        raise TapmlError(str(e)) from e
    if not callable(factory):
        raise TapmlError(f"{spec} is not callable")
    return factory


def load_workload(spec: str) -> Workload:
    """Build the workload a spec names; any failure is a one-line ``TapmlError``."""
    if spec.startswith("zoo:"):
        from .zoo import zoo_factory

        factory = zoo_factory(spec[4:])
    else:
        factory = _import_factory(spec)
    try:
        made = factory()
    except TapmlError:
        raise
    except Exception as e:
        raise TapmlError(f"model factory {spec} raised {type(e).__name__}: {e}") from e
    if isinstance(made, Workload):
        workload = made
    elif isinstance(made, tuple) and len(made) == 2:
        workload = Workload(model=made[0], inputs=made[1])
    else:
        raise TapmlError(f"model factory {spec} must return (model, inputs) or a Workload, "
                         f"got {type(made).__name__}")
    if not isinstance(workload.model, torch.nn.Module):
        raise TapmlError(f"model factory {spec} returned {type(workload.model).__name__}, not a torch.nn.Module")
    workload.name = workload.name or spec
    workload.model.eval()
    return workload

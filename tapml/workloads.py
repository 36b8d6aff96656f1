"""Resolve a model spec (``zoo:NAME``, ``FILE.py:factory``, ``pkg.module:factory``) to a workload.

The factory contract: a zero-argument callable returning either a ``Workload`` or
a pair ``(model, inputs)``, where ``inputs`` is a tuple of positional arguments,
a dict of keyword arguments, or a single tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .core import TapmlError, import_object
from .zoo import Workload, zoo_factory

__all__ = ["Workload", "load_workload"]


def _import_factory(spec: str) -> Callable[[], Any]:
    if ":" not in spec:
        raise TapmlError(f"model spec {spec!r} is not zoo:NAME, FILE.py:factory or pkg.module:factory")
    factory = import_object(spec, "model")
    if not callable(factory):
        raise TapmlError(f"{spec} is not callable")
    return factory


def load_workload(spec: str) -> Workload:
    """Build the workload a spec names; any failure is a one-line ``TapmlError``."""
    if spec.startswith("zoo:"):
        factory = zoo_factory(spec[4:])
    else:
        factory = _import_factory(spec)
    try:
        made = factory()
    except TapmlError:
        raise
    except ModuleNotFoundError as e:  # an optional dependency (transformers, the MiniLM wheel) is absent here
        raise TapmlError(f"model {spec} needs the Python package {e.name!r}, which is not installed here") from e
    except (Exception, SystemExit) as e:  # a factory that calls sys.exit() must not end tapml silently
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

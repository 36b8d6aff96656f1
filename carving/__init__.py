"""Carving: record every operator call of an eager run into a fixture store.

Public API: ``carve`` a callable, open the result as a ``FixtureStore``, ``replay``
its ops on the reference, mark named ``step``s of a multi-call run.
"""

from .atomic import AtomicDir, OutputError
from .carve import CarveResult, ModelRaised, carve
from .layout import TensorRef
from .replay import ReplayReport, replay, resolve_op, run_op
from .store import SCHEMA_VERSION, FixtureStore, StoreError
from .tracer import CarveOptions, signature, step

__all__ = [
    "AtomicDir",
    "OutputError",
    "SCHEMA_VERSION",
    "CarveOptions",
    "CarveResult",
    "FixtureStore",
    "ModelRaised",
    "ReplayReport",
    "StoreError",
    "TensorRef",
    "carve",
    "replay",
    "resolve_op",
    "run_op",
    "signature",
    "step",
]

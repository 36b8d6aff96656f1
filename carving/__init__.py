"""Carving: record every operator call of an eager run into a fixture store.

Public API: ``carve`` a callable, open the result as a ``FixtureStore``, ``replay``
its ops on the reference, mark named ``step``s of a multi-call run.
"""

from .atomic import AtomicDir, OutputError
from .carve import CarveResult, ModelRaised, carve
from .graph import Graph
from .layout import TensorRef, tensor_key
from .manifest import OP_COLUMNS, Manifest, check_manifest, read_manifest, store_schema
from .replay import Mismatch, ReplayReport, replay, run_op
from .store import SCHEMA_VERSION, FixtureStore, StoreError, StoreWriter
from .tracer import CarveError, CarveOptions, signature, step

__all__ = [
    "AtomicDir",
    "OutputError",
    "OP_COLUMNS",
    "SCHEMA_VERSION",
    "CarveError",
    "CarveOptions",
    "CarveResult",
    "FixtureStore",
    "Graph",
    "Manifest",
    "Mismatch",
    "ModelRaised",
    "ReplayReport",
    "StoreError",
    "StoreWriter",
    "TensorRef",
    "carve",
    "check_manifest",
    "read_manifest",
    "replay",
    "run_op",
    "signature",
    "step",
    "tensor_key",
    "store_schema",
]

"""Reaching a target over RPC: the worker, the client proxy that is a ``Target``, spawning.

Control calls are JSON over rpyc in service mode; tensor bytes travel as raw
frames on a separate data socket and are cached on the worker by content hash.
"""

from .client import PayloadTooLarge, RemoteTarget, TargetLost, WorkerCrashed, WorkerTimeout, parse_address
from .spawn import SpawnedWorker, run_worker, spawn_worker, supervise_worker
from .worker import WorkerConfig, serve

__all__ = [
    "PayloadTooLarge",
    "RemoteTarget",
    "TargetLost",
    "SpawnedWorker",
    "WorkerConfig",
    "WorkerCrashed",
    "WorkerTimeout",
    "parse_address",
    "serve",
    "spawn_worker",
    "supervise_worker",
    "run_worker",
]

"""Reaching a target over RPC: the worker, the client proxy that is a ``Platform``, spawning.

Control calls are JSON over rpyc in service mode; tensor bytes travel as raw
frames on a separate data socket and are cached on the worker by content hash.
"""

from .client import OpFailed, PayloadTooLarge, RemotePlatform, WorkerCrashed, WorkerTimeout, parse_address
from .spawn import SpawnedWorker, spawn_worker, supervise
from .worker import WorkerConfig, serve

__all__ = [
    "OpFailed",
    "PayloadTooLarge",
    "RemotePlatform",
    "SpawnedWorker",
    "WorkerConfig",
    "WorkerCrashed",
    "WorkerTimeout",
    "parse_address",
    "serve",
    "spawn_worker",
    "supervise",
]

"""Target platforms: the ``Platform`` plugin interface, the engine-facing ``Target``, the registry, the built-ins.

A platform says what it ``supports``, ``compile``s an op (``OpCall``) into a
kernel and ``run``s it. The engine talks to a ``Target`` (``prepare``/``execute``
/``stats``): a ``LocalTarget`` wraps a platform in this process; the remote
proxy in ``tapml.remote`` is another. Third parties add platforms through the
``tapml.platforms`` entry-point group or as ``FILE.py:Class``. Nothing here
knows about RPC or about carving.
"""

from .base import ALL_DTYPES, Capabilities, KernelTrace, Platform, PlatformError, Support, Unsupported
from .emulation import BFloat16, Float16, ReducedPrecision
from .program import UnitProgram, cast_floats, run_program
from .registry import (
    BUILTINS,
    ENTRY_POINT_GROUP,
    describe_platforms,
    get_platform,
    list_platforms,
    open_local,
    platform_class,
)
from .target import LocalTarget, Target, TargetWrapper
from .torch_eager import TorchCUDA, TorchCUDATF32, TorchPlatform
from .wrapped import WrappedPlatform

__all__ = [
    "ALL_DTYPES",
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "BFloat16",
    "Capabilities",
    "Float16",
    "KernelTrace",
    "LocalTarget",
    "Platform",
    "PlatformError",
    "ReducedPrecision",
    "Support",
    "Target",
    "TargetWrapper",
    "TorchCUDA",
    "TorchCUDATF32",
    "TorchPlatform",
    "Unsupported",
    "UnitProgram",
    "WrappedPlatform",
    "cast_floats",
    "run_program",
    "describe_platforms",
    "get_platform",
    "list_platforms",
    "open_local",
    "platform_class",
]

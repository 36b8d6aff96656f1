"""Target platforms: the ``Platform`` interface, the registry and the built-ins.

A platform says what it ``supports``, ``compile``s an op (``OpCall``) into a
kernel — once per signature — and ``run``s it. Third parties add one through the
``tapml.platforms`` entry-point group or as ``FILE.py:Class``. Nothing here
knows about RPC or about carving.
"""

from .base import Capabilities, Platform, PlatformError, Support, Unsupported, WrappedPlatform
from .emulation import BFloat16, Float16, ReducedPrecision
from .opcall import OpCall, bind_args, flatten_outputs
from .registry import BUILTINS, ENTRY_POINT_GROUP, get_platform, import_object, list_platforms, platform_class
from .tensors import TensorSpec, relayout
from .torch_eager import TorchCUDA, TorchPlatform, resolve_op

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "BFloat16",
    "Capabilities",
    "Float16",
    "OpCall",
    "Platform",
    "PlatformError",
    "ReducedPrecision",
    "Support",
    "TensorSpec",
    "TorchCUDA",
    "TorchPlatform",
    "Unsupported",
    "WrappedPlatform",
    "bind_args",
    "flatten_outputs",
    "get_platform",
    "import_object",
    "list_platforms",
    "platform_class",
    "relayout",
    "resolve_op",
]

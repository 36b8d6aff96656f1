"""Finding platforms: built-ins, the ``tapml.platforms`` entry-point group, ``FILE.py:Class``."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .base import Platform, PlatformError

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "import_object", "platform_class", "get_platform", "list_platforms"]

ENTRY_POINT_GROUP = "tapml.platforms"
BUILTINS = {
    "torch-cpu": "tapml.platforms.torch_eager:TorchPlatform",
    "torch-cuda": "tapml.platforms.torch_eager:TorchCUDA",
    "fp16": "tapml.platforms.emulation:Float16",
    "bf16": "tapml.platforms.emulation:BFloat16",
    "tvm-llvm": "tapml.platforms.tvm:TVMLLVM",
    "tvm-webgpu": "tapml.platforms.webgpu:TVMWebGPU",
}


def import_object(spec: str, what: str = "object") -> Any:
    """``path/to/file.py:name`` or ``pkg.module:name`` → the named attribute."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise PlatformError(f"{what} {spec!r} is not FILE.py:NAME or pkg.module:NAME")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise PlatformError(f"{what} file {target} does not exist")
        name = f"tapml_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            try:
                mod_spec.loader.exec_module(module)
            except Exception as e:
                sys.modules.pop(name, None)
                raise PlatformError(f"importing {target} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise PlatformError(f"cannot import module {target!r}: {e}") from e
        except Exception as e:
            raise PlatformError(f"importing {target} raised {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise PlatformError(f"{target} has no {attr!r}")
    return getattr(module, attr)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def platform_class(name: str) -> type[Platform]:
    """Resolve a platform name, entry point or ``FILE.py:Class`` to its class."""
    if name in BUILTINS:
        cls = import_object(BUILTINS[name], "platform")
    elif ":" in name:
        cls = import_object(name, "platform")
    else:
        eps = _entry_points()
        if name not in eps:
            known = ", ".join(sorted(BUILTINS) + sorted(eps))
            raise PlatformError(f"unknown platform {name!r} (known: {known}; or pass FILE.py:Class)")
        try:
            cls = eps[name].load()
        except Exception as e:
            raise PlatformError(f"platform {name!r} failed to load: {type(e).__name__}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise PlatformError(f"{name} is not a tapml.platforms.Platform subclass")
    return cls


def get_platform(name: str) -> Platform:
    """An instance of the named platform, refusing one not available here."""
    cls = platform_class(name)
    available = cls.availability()
    if not available:
        raise PlatformError(f"platform {name} is not available here: {available.reason}")
    try:
        platform = cls()
    except PlatformError:
        raise
    except Exception as e:
        raise PlatformError(f"platform {name} failed to start: {type(e).__name__}: {e}") from e
    if not platform.name:
        type(platform).name = name
    return platform


def list_platforms() -> list[dict]:
    """Every known platform with whether it is available here and why not."""
    rows = []
    names = list(BUILTINS) + sorted(set(_entry_points()) - set(BUILTINS))
    for name in names:
        row = {"name": name, "source": "built-in" if name in BUILTINS else "entry point"}
        try:
            cls = platform_class(name)
            available = cls.availability()
            row.update(description=cls.description, available=available.ok, reason=available.reason)
            if available:
                row["capabilities"] = cls().capabilities().to_json()
        except PlatformError as e:
            row.update(description="", available=False, reason=str(e))
        rows.append(row)
    return rows

"""Finding platforms: built-ins, the ``tapml.platforms`` entry-point group, ``FILE.py:Class``."""

from __future__ import annotations

import importlib.metadata

from tapml.core import TapmlError, import_object

from .base import Platform, PlatformError
from .target import LocalTarget

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "platform_class", "get_platform", "open_local", "list_platforms",
           "describe_platforms"]

ENTRY_POINT_GROUP = "tapml.platforms"
BUILTINS = {
    "torch-cpu": "tapml.platforms.torch_eager:TorchPlatform",
    "torch-cuda": "tapml.platforms.torch_eager:TorchCUDA",
    "torch-cuda-tf32": "tapml.platforms.torch_eager:TorchCUDATF32",
    "fp16": "tapml.platforms.emulation:Float16",
    "bf16": "tapml.platforms.emulation:BFloat16",
    "tvm-llvm": "tapml.platforms.tvm:TVMLLVM",
    "tvm-webgpu": "tapml.platforms.webgpu:TVMWebGPU",
}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def platform_class(name: str) -> type[Platform]:
    """Resolve a platform name, entry point or ``FILE.py:Class`` to its class."""
    if name in BUILTINS or ":" in name:
        try:
            cls = import_object(BUILTINS.get(name, name), "platform")
        except PlatformError:
            raise
        except TapmlError as e:
            raise PlatformError(str(e)) from None
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


def open_local(name: str) -> LocalTarget:
    """The named platform in this process, behind the engine-facing interface."""
    return LocalTarget(get_platform(name))


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


def describe_platforms(extra: tuple[str, ...] | list[str] = ()) -> list[dict]:
    """``list_platforms`` plus the named ``FILE.py:Class`` / module platforms (loading them)."""
    rows = list_platforms()
    for name in extra:
        if any(r["name"] == name for r in rows):
            continue
        cls = platform_class(name)
        available = cls.availability()
        rows.append({"name": name, "source": "file" if ".py:" in name else "module", "description": cls.description,
                     "available": available.ok, "reason": available.reason,
                     **({"capabilities": cls().capabilities().to_json()} if available else {})})
    return rows

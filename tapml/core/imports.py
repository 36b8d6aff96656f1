"""``FILE.py:name`` and ``pkg.module:name`` → the named object (platforms, model factories)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .errors import TapmlError

__all__ = ["import_object"]


def import_object(spec: str, what: str = "object") -> Any:
    """The attribute a spec names; any failure is a one-line ``TapmlError``.

    Only ever called with what the user typed (a CLI flag, a config file), never with
    a name from the wire or a store."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise TapmlError(f"{what} {spec!r} is not FILE.py:NAME or pkg.module:NAME")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise TapmlError(f"{what} file {target} does not exist")
        name = f"tapml_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            try:
                mod_spec.loader.exec_module(module)
            except (Exception, SystemExit) as e:
                sys.modules.pop(name, None)
                raise TapmlError(f"importing {target} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise TapmlError(f"cannot import module {target!r}: {e}") from e
        except (Exception, SystemExit) as e:
            raise TapmlError(f"importing {target} raised {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise TapmlError(f"{target} has no {attr!r}")
    return getattr(module, attr)

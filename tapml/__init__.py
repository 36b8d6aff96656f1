"""tapml: bring PyTorch models to new platforms top-down — carve, migrate, localize, test.

The Python API (``tapml.carve``, ``tapml.offload``, ``tapml.replay``, ``tapml.inspect``,
``tapml.repro``, ``tapml.report``, ``tapml.diff``, ``tapml.load_run``, ``tapml.emit_tests``)
is what the ``tapml`` command line runs; see ``tapml.api``. Importing ``tapml``
loads torch and nothing heavier: compilers, browsers and plotting load where used.
"""

import os
import sys

# tapml's processes share the cores with their worker processes; OpenMP threads that
# spin after each parallel region (libgomp's default) starve the other process. Must be
# set before torch loads, so it lives here; a user's own setting wins. With torch imported
# first, libgomp has read its environment already: ``OMP_SPINS`` says so (a local worker warns).
OMP_SPINS = "torch" in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _source_tree() -> None:
    """Run from a source checkout without installing (``PYTHONPATH=. python -m tapml``, a GPU box with no
    package index): ``pyproject.toml`` maps the top-level folders ``carving``, ``platforms``, ``remote``
    and ``reports`` into ``tapml``; without an install nothing does, so the checkout's root joins this
    package's search path. An installed tapml (no ``pyproject.toml`` beside it) is left alone."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "carving" / "__init__.py").is_file():
        return
    if importlib.util.find_spec(f"{__name__}.carving") is None:
        __path__.append(str(root))


_source_tree()

from .core import CheckFailed, TapmlError, __version__, record_openmp_spins  # noqa: E402

record_openmp_spins(OMP_SPINS)

_LAZY = {
    "carve": "api", "offload": "api", "replay": "api", "inspect": "api", "open_store": "api", "repro": "api",
    "report": "api", "diff": "api", "load_run": "api", "emit_tests": "api", "Progress": "api",
    "Workload": "workloads", "load_workload": "workloads", "Run": "record", "Settings": "settings",
}

__all__ = ["__version__", "CheckFailed", "TapmlError", *_LAZY]


def __getattr__(name: str):
    """The API on first use, so ``import tapml`` stays light (``tapml.core`` needs torch only)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tapml' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value

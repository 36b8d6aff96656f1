"""tapml: bring PyTorch models to new platforms top-down — carve, migrate, localize, test."""

import os

# tapml's processes share the cores with their worker processes; OpenMP threads that
# spin after each parallel region (libgomp's default) starve the other process. Must be
# set before torch loads, so it lives here; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._version import __version__  # noqa: E402
from .errors import CheckFailed, TapmlError  # noqa: E402
from .workloads import Workload, load_workload  # noqa: E402

__all__ = ["__version__", "CheckFailed", "TapmlError", "Workload", "load_workload"]

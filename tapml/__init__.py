"""tapml: bring PyTorch models to new platforms top-down — carve, migrate, localize, test."""

from ._version import __version__
from .errors import CheckFailed, TapmlError
from .workloads import Workload, load_workload

__all__ = ["__version__", "CheckFailed", "TapmlError", "Workload", "load_workload"]

"""Judging a target's outputs: comparison metrics, tolerances and their origins, the verdict rules."""

from .compare import HISTOGRAM_EDGES, compare, compare_outputs, has_nonfinite, rmse, saturated
from .judge import RULES, Judge, fp64_outputs
from .tolerance import DTYPE_DEFAULTS, Tolerance, ToleranceTable, parse_tolerance, split_tolerances

__all__ = ["DTYPE_DEFAULTS", "HISTOGRAM_EDGES", "RULES", "Judge", "Tolerance", "ToleranceTable", "compare",
           "compare_outputs", "fp64_outputs", "has_nonfinite", "parse_tolerance", "rmse", "saturated",
           "split_tolerances"]

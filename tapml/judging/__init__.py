"""Judging a target's outputs: comparison metrics, tolerances and their origins, the verdict rules."""

from .bounds import LAMBDA, Bound, op_bounds, op_class, unit_roundoff
from .compare import HISTOGRAM_EDGES, compare, has_nonfinite, output_label, rmse, saturated
from .judge import RULES, Judge, fp64_outputs
from .tolerance import DTYPE_DEFAULTS, Tolerance, ToleranceTable, parse_tolerance, split_tolerances

__all__ = ["DTYPE_DEFAULTS", "HISTOGRAM_EDGES", "LAMBDA", "RULES", "Bound", "Judge", "Tolerance", "ToleranceTable",
           "compare", "fp64_outputs", "has_nonfinite", "op_bounds", "op_class", "output_label", "parse_tolerance",
           "rmse", "saturated", "split_tolerances", "unit_roundoff"]

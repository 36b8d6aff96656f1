"""Run record → self-contained HTML: the divergence report, the two-run diff, the notebook card, and
the per-module errors as a Model Explorer overlay.

Reads only the run record (``run.json``); works from ``file://`` with no network.
"""

from pathlib import Path

from tapml.record import Run

from .diff import diff_records, render_diff, write_diff
from .explorer import model_explorer_data
from .html import fmt, human_bytes, render_report, summary_html, write_report, write_text
from .run import SUPPORTED_SCHEMA, ReportError, load_run
from .tree import TreeNode, module_tree, ops_tree
from .units import unit_error, unit_lines

__all__ = ["ReportError", "SUPPORTED_SCHEMA", "TreeNode", "diff_records", "fmt", "human_bytes", "load_run",
           "model_explorer_data", "module_tree", "ops_tree", "render_diff", "render_report", "summary_html",
           "unit_error", "unit_lines", "write_diff", "write_model_explorer", "write_report"]

Run.html_fragment = summary_html  # a Run shows the report's summary and culprit card in Jupyter


def write_model_explorer(record: Run, out: str | Path) -> Path:
    """Write the Model Explorer node-data overlay (per-module worst local error) as JSON."""
    import json

    return write_text(out, json.dumps(model_explorer_data(record), indent=1))

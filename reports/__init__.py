"""Run record → self-contained HTML: the divergence report and the two-run diff.

Reads only the run record (``run.json``); works from ``file://`` with no network.
"""

from .html import diff_records, fmt, render_diff, render_report, write_diff, write_report
from .run import SUPPORTED_SCHEMA, ReportError, load_run

__all__ = ["ReportError", "SUPPORTED_SCHEMA", "diff_records", "fmt", "load_run", "render_diff", "render_report",
           "write_diff", "write_report"]

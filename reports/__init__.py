"""Run record → self-contained HTML and JSON reports.

Filled in by the report issue.
"""

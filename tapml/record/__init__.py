"""The typed run record: what the engine produces and every front end reads (``run.json``)."""

from .run import (
    RUN_SCHEMA,
    Culprit,
    Metrics,
    OpRef,
    OpRow,
    Oracle,
    Plan,
    RandomCheck,
    RandomDraw,
    Reference,
    Run,
    Step,
    TargetEvent,
    Timing,
    Tokens,
    Tolerance,
    Worst,
    run_schema,
)

__all__ = ["RUN_SCHEMA", "Culprit", "Metrics", "OpRef", "OpRow", "Oracle", "Plan", "RandomCheck", "RandomDraw",
           "Reference", "Run", "Step", "TargetEvent", "Timing", "Tokens", "Tolerance", "Worst", "run_schema"]

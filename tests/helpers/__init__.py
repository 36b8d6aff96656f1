"""Test helpers (importable as ``helpers`` from the tests)."""

from tapml.judge import Judge
from tapml.localize import local_pass


def run_ops(store, target, indices=None) -> list[dict]:
    """The isolated pass over every call (or ``indices``), as a list of rows."""
    return list(local_pass(store, target, Judge(), indices=indices, all_calls=True).values())


def ran(rows) -> list[dict]:
    """Rows of ops that ran on the target (and so have local metrics)."""
    return [r for r in rows if "local" in r]

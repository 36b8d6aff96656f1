"""Test helpers (importable as ``helpers`` from the tests)."""

from tapml.engine import local_pass
from tapml.judging import Judge
from tapml.platforms import open_local


def run_ops(store, target, indices=None) -> list:
    """The isolated pass over every call (or ``indices``), as a list of ``LocalResult``s."""
    if isinstance(target, str):
        target = open_local(target)
    return list(local_pass(store, target, Judge(), indices=indices, all_calls=True).values())


def ran(results) -> list:
    """Results of ops that ran on the target (and so have local metrics)."""
    return [r for r in results if r.local is not None]

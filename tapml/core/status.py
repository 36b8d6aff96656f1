"""Every status tapml records: an op's outcome, a mixed-run outcome, a run's verdict.

A ``StrEnum``: members compare equal to their strings and serialize as them, so
``run.json`` keeps its plain-string statuses.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Status"]


class Status(StrEnum):
    OK = "ok"
    DIVERGENT = "divergent"
    UNSUPPORTED = "unsupported"
    CRASHED = "crashed"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"
    OFFLOADED = "offloaded"  # a mixed run: the target's output flowed on
    FELL_BACK = "fell back"  # a mixed run: the target ran it but the reference's output flowed on
    INCOMPLETE = "incomplete"  # a verdict: the run could not check everything it was asked to

    @property
    def failed(self) -> bool:
        """The target could not complete the op (infrastructure, not numerics)."""
        return self in (Status.CRASHED, Status.TIMEOUT)

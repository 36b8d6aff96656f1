"""The error roots: a user's mistake (exit 2), a failed check (exit 1), a target that failed an op."""

from __future__ import annotations

from .status import Status

__all__ = ["TapmlError", "CheckFailed", "OpRefused", "OpFailed"]


class TapmlError(Exception):
    """A problem the user can fix — a spec that does not resolve, an existing output, a corrupt
    store, a platform that cannot start. Every entry point shows it as one line and exits 2."""


class CheckFailed(Exception):
    """A check ran and failed (a divergent verdict, a replay that is not bit-exact): exit 1."""


class OpRefused(TapmlError):
    """An op name that is not an allow-listed, side-effect-free operator overload.

    ``kind``: ``"namespace"`` when the op is well-formed but its namespace is not allowed
    (a library the store or client did not name, or one that is not trusted) — such an op
    is refused where it would run; every other kind marks the name itself as hostile or broken."""

    def __init__(self, message: str, kind: str = "name"):
        super().__init__(message)
        self.kind = kind


class OpFailed(Exception):
    """The target could not complete one op; ``status`` is how the engine records it.

    ``fatal``: the target is gone for the rest of the run (a worker that could not be
    reached again), so the engine stops sending it ops and says the run is incomplete."""

    def __init__(self, message: str, status: Status = Status.CRASHED, *, fatal: bool = False):
        super().__init__(message)
        self.status = Status(status)
        self.fatal = fatal

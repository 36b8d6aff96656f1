"""Errors a user can fix: the CLI shows them as one line and exits 2."""

from __future__ import annotations

__all__ = ["TapmlError", "CheckFailed"]


class TapmlError(Exception):
    """Bad input: a spec that does not resolve, an existing output, a corrupt store."""


class CheckFailed(Exception):
    """A check ran and failed (e.g. replay not bit-exact): exit 1."""

"""Bounded caches: a dict that drops its oldest entry before it outgrows a limit.

Why: memos keyed per op or per content (parsed ops, tolerances, NaN/Inf counts) must not grow with the
run: at 1.1B parameters a generation is 11,538 ops, and a memo that kept every one held megabytes that
the next forward reads again only once. Insertion order is age: the oldest entry goes first.
"""

from __future__ import annotations

__all__ = ["make_room"]


def make_room(cache: dict, limit: int) -> None:
    """Drop ``cache``'s oldest entry if it holds ``limit`` (call before adding one)."""
    if len(cache) >= limit:
        del cache[next(iter(cache))]

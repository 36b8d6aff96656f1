"""A directory that appears whole or not at all: built under a temporary sibling
name and renamed into place on ``commit``; an exception or a kill leaves no
half-written result at the destination."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tapml.core import TapmlError

__all__ = ["AtomicDir", "OutputError"]


class OutputError(TapmlError):
    """The destination cannot be written; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(parent: Path, name: str) -> None:
    """Remove what a killed run left beside ``name``: temporary or old directories whose process is gone.

    The owner's pid is part of each such name, so a directory of a run still going is left alone."""
    prefixes = (f".{name}.tapml-tmp-", f".{name}.tapml-old-")
    with os.scandir(parent) as entries:  # one pass, no glob pattern compiled per carve
        stale = [e for e in entries if e.name.startswith(prefixes)]
    for entry in stale:
        prefix = next(p for p in prefixes if entry.name.startswith(p))
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


class AtomicDir:
    def __init__(self, path: str | os.PathLike, *, force: bool = False):
        self.path = Path(path)
        if self.path.exists() and not force:
            raise OutputError(f"{self.path} already exists; pass --force to replace it")
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path} exists and is not a directory")
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            _clean_stale(parent, self.path.name)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tapml-tmp-{os.getpid()}-", dir=parent))
        except OSError as e:
            raise OutputError(f"cannot write to {parent}: {e.strerror or e}") from None
        self._done = False

    def commit(self) -> Path:
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.tapml-old-{os.getpid()}-{os.urandom(4).hex()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return self.path

    def abort(self) -> None:
        if not self._done:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._done = True

    def __enter__(self) -> AtomicDir:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # no-op after commit

"""One settings object for every entry point: which target, how to reach it, how to judge it.

Built from CLI flags, pytest options / ini keys / ``[tool.tapml]`` in
pyproject.toml, or a ``--config`` TOML file; it validates everything up front
(bad input fails before any work), opens the target and builds the judge — so
the CLI, the pytest plugin, the matrix, emitted tests and the Python API all
judge the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .core import TapmlError
from .judging import RULES, Judge, ToleranceTable
from .platforms import PlatformError, Target, open_local, platform_class
from .remote import RemoteTarget

__all__ = ["Settings", "read_token"]


def read_token(token_file: str | None) -> str | None:
    if token_file is None:
        return None
    try:
        token = Path(token_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise TapmlError(f"cannot read token file {token_file}: {getattr(e, 'strerror', None) or e}") from None
    if not token or any(c.isspace() for c in token):
        raise TapmlError(f"token file {token_file} must hold one token with no spaces")
    return token


@dataclass
class Settings:
    """What the user asked for; ``open_target`` and ``judge`` turn it into the engine's objects."""

    platform: str | None = None
    remote: str | None = None  # HOST:PORT of a running worker (default: spawn one here)
    token_file: str | None = None
    timeout: float = 60.0  # seconds per op on the target
    tolerances: tuple[str, ...] = ()
    config: str | None = None
    rule: str = "bound"
    all_calls: bool = False
    in_process: bool = False  # run the platform in this process (no worker; tests and notebooks)
    reconnect_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.timeout, (int, float)) or not math.isfinite(self.timeout) or self.timeout <= 0:
            raise TapmlError(f"--timeout must be a positive number of seconds, not {self.timeout!r}")
        if self.rule not in RULES:
            raise TapmlError(f"--rule {self.rule!r}: choose from {', '.join(RULES)}")
        self.tolerances = tuple(self.tolerances)
        self.table  # noqa: B018 — a bad tolerance or config fails here, before any work

    @cached_property
    def table(self) -> ToleranceTable:
        return ToleranceTable.build(self.tolerances, self.config)

    def judge(self, target: Target) -> Judge:
        """The judge for ``target``: its compute dtype decides the default tolerances."""
        return Judge(self.table, target.capabilities().compute_dtype, self.rule)

    def open_target(self, platform: str | None = None, *, remote: str | None = None) -> Target:
        """The engine's view of the target; it cannot tell which kind it got."""
        platform = platform or self.platform
        remote = remote or self.remote
        if remote is not None:
            target = RemoteTarget(remote, token=read_token(self.token_file), timeout=self.timeout,
                                  reconnect_s=self.reconnect_s)
            if platform is not None and platform != target.name:
                target.close()
                raise TapmlError(f"the worker at {remote} serves {target.name}, not {platform}")
            return target
        if platform is None:
            raise TapmlError("give --platform NAME (or --remote HOST:PORT)")
        if self.in_process:
            return open_local(platform)
        available = platform_class(platform).availability()  # refuse here, not in a worker's log
        if not available:
            raise PlatformError(f"platform {platform} is not available here: {available.reason}")
        return RemoteTarget(spawn=platform, timeout=self.timeout)

"""Opening the target: a spawned local worker (the default), a remote one, or in-process."""

from __future__ import annotations

from pathlib import Path

from .errors import TapmlError
from .platforms import Platform, PlatformError, get_platform, platform_class
from .remote import RemotePlatform

__all__ = ["open_target", "read_token"]


def read_token(token_file: str | None) -> str | None:
    if token_file is None:
        return None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as e:
        raise TapmlError(f"cannot read token file {token_file}: {e.strerror or e}") from None
    if not token or any(c.isspace() for c in token):
        raise TapmlError(f"token file {token_file} must hold one token with no spaces")
    return token


def open_target(platform: str | None, *, remote: str | None = None, token_file: str | None = None,
                in_process: bool = False, timeout: float = 60.0) -> Platform:
    """The engine's view of the target; it cannot tell which of the three it got."""
    try:
        if remote is not None:
            target = RemotePlatform(remote, token=read_token(token_file), timeout=timeout)
            if platform is not None and platform != target.name:
                target.close()
                raise TapmlError(f"the worker at {remote} serves {target.name}, not {platform}")
            return target
        if platform is None:
            raise TapmlError("give --platform NAME (or --remote HOST:PORT)")
        if in_process:
            return get_platform(platform)
        available = platform_class(platform).availability()  # refuse here, not in a worker's log
        if not available:
            raise TapmlError(f"platform {platform} is not available here: {available.reason}")
        return RemotePlatform(spawn=platform, timeout=timeout)
    except PlatformError as e:
        raise TapmlError(str(e)) from e

"""Starting worker processes: a local one on a free loopback port, or a supervised one.

Why a subprocess even on one machine: a kernel that segfaults, hangs or runs
out of memory must cost one op, not the run; the parent kills and respawns it.
"""

from __future__ import annotations

import math
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tapml.platforms import PlatformError

from .worker import READY, WorkerConfig, serve

__all__ = ["SpawnedWorker", "spawn_worker", "supervise_worker", "run_worker"]


@dataclass
class SpawnedWorker:
    proc: subprocess.Popen
    host: str
    port: int
    token: str
    log: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def _start(config: WorkerConfig, env: dict | None, pass_fds=()) -> tuple[subprocess.Popen, Path]:
    log = Path(tempfile.mkstemp(prefix="tapml-worker-", suffix=".log")[1])
    child_env = dict(os.environ if env is None else env, TAPML_WORKER_TOKEN=config.token)
    child_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # do not spin on cores the client needs
    public = replace(config, token="")  # the token travels in the environment, not argv
    proc = subprocess.Popen(
        [sys.executable, "-m", "tapml.remote.worker", public.dumps()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "wb"), env=child_env,
        pass_fds=pass_fds, start_new_session=True,
    )
    return proc, log


def _await_ready(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    buf = b""
    poller = select.poll()  # not select(): a busy process may hold fds past FD_SETSIZE
    poller.register(proc.stdout, select.POLLIN)
    while time.monotonic() < deadline:
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith(READY):
                return int(line.split()[-1])
    proc.kill()
    proc.wait()
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    if tail:
        raise PlatformError(tail[0].removeprefix("tapml worker: error: "))
    raise PlatformError(f"the worker did not start within {timeout:.0f}s")


def spawn_worker(platform: str, *, host: str = "127.0.0.1", token: str | None = None,
                 startup_timeout: float = 120.0, env: dict | None = None, **options) -> SpawnedWorker:
    """Start ``tapml worker`` for ``platform`` on a free port; returns once it accepts connections."""
    token = secrets.token_hex(16) if token is None else token
    config = WorkerConfig(platform=platform, host=host, port=0, token=token, announce=True, watch_stdin=True,
                          **options)
    proc, log = _start(config, env)
    return SpawnedWorker(proc, host, _await_ready(proc, log, startup_timeout), token, log)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def supervise_worker(config: WorkerConfig, *, kernel_timeout: float = 60.0, startup_timeout: float = 120.0) -> None:
    """Keep an execution subprocess serving ``config`` on a fixed port; restart it when it
    dies, and kill it when one kernel runs past ``kernel_timeout`` (a watchdog)."""
    port = config.port or _free_port(config.host)
    announced = False
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    while not stop:
        read_fd, write_fd = os.pipe()
        child = replace(config, port=port, announce=True, watch_stdin=True, watchdog_fd=write_fd)
        proc, log = _start(child, None, pass_fds=(write_fd,))
        os.close(write_fd)
        try:
            _await_ready(proc, log, startup_timeout)
        except PlatformError as e:
            os.close(read_fd)
            print(f"tapml worker: error: {e}", file=sys.stderr, flush=True)
            raise
        if not announced:
            line = f"{READY} {config.host} {port}" if config.announce else \
                f"tapml worker: supervising {config.platform} on {config.host}:{port}"
            print(line, file=sys.stdout if config.announce else sys.stderr, flush=True)
            announced = True
        busy_since = None
        with os.fdopen(read_fd, "rb", buffering=0) as beats:
            poller = select.poll()
            poller.register(beats, select.POLLIN)
            while proc.poll() is None and not stop:
                if poller.poll(500):
                    data = os.read(beats.fileno(), 4096)
                    if not data:
                        break
                    last = data.strip().splitlines()[-1:] or [b""]
                    busy_since = time.monotonic() if last[0] == b"B" else None
                if busy_since is not None and time.monotonic() - busy_since > kernel_timeout:
                    print(f"tapml worker: a kernel ran past {kernel_timeout:.0f}s; restarting",
                          file=sys.stderr, flush=True)
                    break
        proc.kill()
        proc.wait()
        if not stop:
            print(f"tapml worker: execution process exited ({proc.returncode}); restarting "
                  f"({log.read_text(errors='replace').strip().splitlines()[-1:] or ''})", file=sys.stderr,
                  flush=True)


def _token_file(port_hint: int) -> Path:
    """A private file for a generated token: only this user can read it."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache" / "tapml")
    base.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="worker-token-", suffix=".txt", dir=base)
    os.fchmod(fd, 0o600)
    os.close(fd)
    return Path(name)


def run_worker(config: WorkerConfig, *, supervise: bool = False, kernel_timeout: float = 60.0) -> None:
    """``tapml worker``: refuse a public bind without a token, generate a token when none is
    given (and say where it is), then serve — supervised or not — until killed."""
    import ipaddress

    from tapml.platforms import platform_class

    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback and not config.token:
        raise PlatformError(f"binding to {config.host} exposes the worker beyond this machine; give --token-file")
    if not math.isfinite(kernel_timeout) or kernel_timeout <= 0:
        raise PlatformError("--kernel-timeout must be a positive number of seconds")
    available = platform_class(config.platform).availability()
    if not available:
        raise PlatformError(f"platform {config.platform} is not available here: {available.reason}")
    if not config.token:
        config = replace(config, token=secrets.token_hex(16))
        path = _token_file(config.port)
        path.write_text(config.token + "\n")
        print(f"tapml worker: no --token-file given; clients must present the token written to {path} "
              f"(--token-file {path})", file=sys.stderr, flush=True)
    try:
        if supervise:
            supervise_worker(config, kernel_timeout=kernel_timeout)
        else:
            serve(config)
    except OSError as e:
        raise PlatformError(f"cannot serve on {config.host}:{config.port}: {e.strerror or e}") from e

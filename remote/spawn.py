"""Starting worker processes: a local one on a free loopback port, or a supervised one.

Why a subprocess even on one machine: a kernel that segfaults, hangs or runs
out of memory must cost one op, not the run; the parent kills and respawns it.
"""

from __future__ import annotations

import math
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from tapml.core import openmp_spins
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
        """Kill it, reap it, and remove its log (read ``log_tail`` first when it matters)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        _remove(self.log)

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


class WorkerExited(PlatformError):
    """The worker process ended before it was ready (killed, crashed, or refused to start)."""

    def __init__(self, message: str, returncode: int | None):
        super().__init__(message)
        self.returncode = returncode


def _start(config: WorkerConfig, env: dict | None, pass_fds=()) -> tuple[subprocess.Popen, Path]:
    """The worker process, its stderr in ``log`` inside a private folder (``_remove`` takes both)."""
    home = Path(tempfile.mkdtemp(prefix="tapml-worker-"))
    log = home / "worker.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    child_env = dict(os.environ if env is None else env, TAPML_WORKER_TOKEN=config.token)
    child_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # do not spin on cores the client needs
    # a runtime dir for drivers that want one (Mesa's, under wgpu): the worker is killed, never exits
    # cleanly, so what it would make for itself would stay in /tmp; this one goes with its log
    child_env.setdefault("XDG_RUNTIME_DIR", str(home))
    public = replace(config, token="")  # the token travels in the environment, not argv
    try:
        with os.fdopen(fd, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tapml.remote.worker", public.dumps()],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=child_env,
                pass_fds=pass_fds, start_new_session=True,
            )
    except BaseException:
        _remove(log)
        raise
    return proc, log


def _remove(log: Path) -> None:
    """A stopped worker's log and the private folder around it."""
    shutil.rmtree(log.parent, ignore_errors=True)


def _exit_text(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _await_ready(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    buf = b""
    poller = select.poll()  # not select(): a busy process may hold fds past FD_SETSIZE
    poller.register(proc.stdout, select.POLLIN)
    ended = False
    while time.monotonic() < deadline:
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            ended = True  # stdout closed: the process is gone
            break
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith(READY):
                return int(line.split()[-1])
    if not ended:
        proc.kill()
    code = proc.wait()
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    if ended and tail and tail[0].startswith("tapml worker: error: "):
        raise WorkerExited(tail[0].removeprefix("tapml worker: error: "), code)
    if ended:
        raise WorkerExited(f"the worker {_exit_text(code)} during start-up"
                           + (f" ({tail[0]})" if tail else ""), code)
    raise WorkerExited(f"the worker did not start within {timeout:.0f}s", None)


def spawn_worker(platform: str, *, host: str = "127.0.0.1", token: str | None = None,
                 startup_timeout: float = 120.0, env: dict | None = None, attempts: int = 3,
                 **options) -> SpawnedWorker:
    """Start ``tapml worker`` for ``platform`` on a free port; returns once it accepts connections.

    A worker killed during start-up (a signal, not its own refusal) is spawned again, up to
    ``attempts`` times; the error says how it ended."""
    _warn_if_spinning()
    token = secrets.token_hex(16) if token is None else token
    config = WorkerConfig(platform=platform, host=host, port=0, token=token, announce=True, watch_stdin=True,
                          **options)
    for attempt in range(attempts):
        proc, log = _start(config, env)
        try:
            return SpawnedWorker(proc, host, _await_ready(proc, log, startup_timeout), token, log)
        except WorkerExited as e:
            _remove(log)
            if e.returncode is None or e.returncode >= 0 or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _warn_if_spinning() -> None:
    """Say so when this process's OpenMP threads spin (``openmp_spins``) on the cores the worker it spawns
    will need; the warning points at the first caller outside tapml."""
    if not openmp_spins():
        return
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("tapml"):
        frame, level = frame.f_back, level + 1
    warnings.warn("torch was imported before tapml without OMP_WAIT_POLICY: this process's OpenMP threads spin "
                  "after each parallel region on the cores its local worker needs (MiniLM with half its layers "
                  "offloaded, 2 cores: 73 against 58 ms per forward); set OMP_WAIT_POLICY=PASSIVE before "
                  "importing torch", RuntimeWarning, stacklevel=level)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _watch(proc: subprocess.Popen, beats, kernel_timeout: float, liveness_s: float, stop: list) -> str | None:
    """Follow one execution process's beats until it must be restarted; returns why (None: stopping)."""
    poller = select.poll()
    poller.register(beats, select.POLLIN)
    busy_since, last = None, time.monotonic()
    while proc.poll() is None and not stop:
        if poller.poll(250):
            data = os.read(beats.fileno(), 4096)
            if not data:
                return None if stop else "its watchdog pipe closed"
            last = time.monotonic()
            marks = [m for m in data.split() if m in (b"B", b"E")]
            if marks:
                busy_since = last if marks[-1] == b"B" else None
        now = time.monotonic()
        if busy_since is not None and now - busy_since > kernel_timeout:
            return f"a kernel ran past {kernel_timeout:.0f}s"
        if busy_since is None and now - last > liveness_s:
            return f"it stopped answering between kernels (no heartbeat for {liveness_s:.0f}s)"
    return None if stop else f"the execution process {_exit_text(proc.returncode)}"


def supervise_worker(config: WorkerConfig, *, kernel_timeout: float = 60.0, startup_timeout: float = 120.0,
                     liveness_s: float = 5.0) -> None:
    """Keep an execution subprocess serving ``config`` on a fixed port; restart it when it dies,
    when one kernel runs past ``kernel_timeout``, or when it stops answering between kernels."""
    port = config.port or _free_port(config.host)
    announced = False
    stop: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    while not stop:
        read_fd, write_fd = os.pipe()
        child = replace(config, port=port, announce=True, watch_stdin=True, watchdog_fd=write_fd,
                        kernel_timeout=kernel_timeout)
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
        with os.fdopen(read_fd, "rb", buffering=0) as beats:
            why = _watch(proc, beats, kernel_timeout, liveness_s, stop)
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-2:]) if log.exists() else ""
        proc.kill()
        proc.wait()
        _remove(log)
        if why is not None and not stop:
            print(f"tapml worker: restarting the execution process: {why}" + (f" ({tail})" if tail else ""),
                  file=sys.stderr, flush=True)


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

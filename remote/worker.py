"""The worker: one platform served over rpyc (service mode) plus a raw data channel.

Control calls (hello, prepare, stats) are the ``exposed_`` methods below and
nothing else is reachable: no classic mode, no public attributes, no pickle;
every reply is a JSON string, so nothing crosses as a remote object. Running an
op happens on the client's data socket (``wire``). A token (first line on the socket) guards both channels, the
worker binds to loopback unless told otherwise, and tensors over the payload cap
are refused while the worker stays up.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import rpyc
import torch
from rpyc.utils.authenticators import AuthenticationError
from rpyc.utils.server import ThreadedServer

from tapml.core import OpCall, content_key
from tapml.platforms import PlatformError, Unsupported, open_local

from .wire import WireError, read_preamble, recv_frame, send_frame, send_tensor

__all__ = ["WorkerConfig", "serve", "SERVER_CONFIG", "READY"]

READY = "TAPML-WORKER READY"
SERVER_CONFIG = {
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "allow_pickle": False,
    "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False,
    "include_local_traceback": False,
    "sync_request_timeout": 30,
}


@dataclass
class WorkerConfig:
    platform: str
    host: str = "127.0.0.1"
    port: int = 0
    token: str = ""
    max_payload: int = 1 << 30  # bytes per tensor
    cache_bytes: int = 4 << 30  # uploaded tensors kept for reuse by hash
    announce: bool = False  # print READY with the port on stdout (for a spawning parent)
    watch_stdin: bool = False  # exit when stdin closes (the spawning parent died)
    watchdog_fd: int | None = None  # report op start/end to a supervisor

    def dumps(self) -> str:
        return json.dumps(asdict(self))


class TensorCache:
    """One client's uploaded tensors by content key; least recently used evicted past a byte budget."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def put(self, key: str, t: torch.Tensor) -> None:
        if key in self._items:
            return
        self._items[key] = t
        self.used += t.numel() * t.element_size()
        while self.used > self.budget and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.used -= old.numel() * old.element_size()

    def get(self, key: str) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is not None:
            self._items.move_to_end(key)
        return t


class _Worker:
    """Process-wide state shared by every connection."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.platform = open_local(config.platform)
        self.sessions: dict[str, _Session] = {}
        self.lock = threading.Lock()  # platforms compile and keep caches: one call at a time
        self.watchdog = os.fdopen(config.watchdog_fd, "w", buffering=1) if config.watchdog_fd is not None else None
        self.data = socket.create_server((config.host, 0))
        threading.Thread(target=self._accept_data, name="tapml-data-accept", daemon=True).start()

    def beat(self, what: str) -> None:
        if self.watchdog is not None:
            try:
                self.watchdog.write(what + "\n")
            except OSError:
                pass

    def _accept_data(self) -> None:
        while True:
            sock, _ = self.data.accept()
            threading.Thread(target=self._attach, args=(sock,), daemon=True).start()

    def _attach(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(10)
            line = read_preamble(sock)
            sock.settimeout(None)
        except (OSError, WireError):
            sock.close()
            return
        kind, _, nonce = line.partition(" ")
        session = self.sessions.get(nonce) if kind == "TAPMLDATA" else None
        if session is None:
            sock.close()
            return
        session.serve(sock)


class _Session:
    """One client: its data socket, its uploaded tensors and the ops it has sent."""

    def __init__(self, worker: _Worker):
        self.worker = worker
        self.nonce = secrets.token_hex(16)
        self.cache = TensorCache(worker.config.cache_bytes)
        self.refused: dict[str, str] = {}
        self.ops: dict[str, OpCall] = {}
        self.sock: socket.socket | None = None

    def serve(self, sock: socket.socket) -> None:
        """The data loop: store tensor frames, answer run frames, until the client goes."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        try:
            while True:
                header, t = recv_frame(sock, self.worker.config.max_payload)
                if header.get("kind") == "tensor":
                    if t is None:
                        self.refused[header["key"]] = header["refused"]
                    else:
                        self.cache.put(header["key"], t)
                elif header.get("kind") == "run":
                    self._run(header)
        except (OSError, WireError, ValueError):
            pass
        finally:
            self.close()

    def _run(self, header: dict) -> None:
        sock = self.sock
        try:
            if "op" in header:
                self.ops[header["sig"]] = OpCall.from_json(header["op"])
            op = self.ops.get(header["sig"])
            if op is None:
                return send_frame(sock, {"kind": "reply", "ok": False, "error": "unknown-op"})
            op = replace(op, index=header["index"], module=header["module"], call=header["call"])
            inputs, missing = [], []
            for ref, spec in zip(header["keys"], op.inputs, strict=True):
                key = ref["base"] if isinstance(ref, dict) else ref
                if key in self.refused:
                    return send_frame(sock, {"kind": "reply", "ok": False, "error": "refused",
                                             "message": self.refused[key]})
                t = self.cache.get(key)
                if t is None:
                    missing.append(key)
                elif isinstance(ref, dict):  # a view into a tensor the worker holds
                    inputs.append(t.reshape(-1).as_strided(ref["shape"], ref["stride"], ref["offset"]))
                else:
                    inputs.append(t.reshape(spec.shape))
            if missing:
                return send_frame(sock, {"kind": "reply", "ok": False, "error": "missing", "keys": missing})
            with self.worker.lock:
                self.worker.beat("B")
                start = time.perf_counter()
                try:
                    outputs = self.worker.platform.execute(op, inputs)
                finally:
                    self.worker.beat("E")
                kernel_s = time.perf_counter() - start
        except Unsupported as e:
            return send_frame(sock, {"kind": "reply", "ok": False, "error": "unsupported", "message": e.reason})
        except Exception as e:
            return send_frame(sock, {"kind": "reply", "ok": False, "error": "failed",
                                     "message": f"{type(e).__name__}: {str(e)[:500]}"})
        for t in outputs:  # kept under their key: an output the next op consumes is not sent back
            t = t.detach().contiguous()
            key = content_key(t.reshape(-1))
            self.cache.put(key, t)
            send_tensor(sock, key, t)
        send_frame(sock, {"kind": "reply", "ok": True, "kernel_s": kernel_s})

    def close(self) -> None:
        self.worker.sessions.pop(self.nonce, None)
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass


def _reply(**fields) -> str:
    return json.dumps(fields)


def make_service(worker: _Worker):
    class WorkerService(rpyc.Service):
        """The exposed methods are the worker's whole control surface."""

        def on_connect(self, conn):
            self._session = _Session(worker)
            worker.sessions[self._session.nonce] = self._session

        def on_disconnect(self, conn):
            self._session.close()

        def exposed_hello(self) -> str:
            p = worker.platform
            return _reply(platform=p.name, description=p.description, capabilities=p.capabilities().to_json(),
                          data_port=worker.data.getsockname()[1], nonce=self._session.nonce,
                          max_payload=worker.config.max_payload, pid=os.getpid(),
                          torch=torch.__version__)

        def exposed_prepare(self, op_json: str) -> str:
            try:
                op = OpCall.loads(op_json)
                with worker.lock:
                    worker.beat("B")
                    try:
                        support = worker.platform.prepare(op)
                    finally:
                        worker.beat("E")
                if support:
                    self._session.ops[op.signature] = op
                return _reply(ok=support.ok, reason=support.reason)
            except Exception as e:
                return _reply(ok=False, reason=f"worker failed to prepare the op: {type(e).__name__}: {e}")

        def exposed_stats(self) -> str:
            return _reply(**{k: int(v) for k, v in worker.platform.stats.items()},
                          cached_bytes=self._session.cache.used)

    return WorkerService


def _authenticator(token: str):
    def authenticate(sock):
        try:
            sock.settimeout(10)
            line = read_preamble(sock)
            sock.settimeout(None)
        except (OSError, WireError) as e:
            raise AuthenticationError(f"no preamble: {e}") from None
        kind, _, given = line.partition(" ")
        if kind != "TAPML1" or not hmac.compare_digest(given.encode(), token.encode()):
            raise AuthenticationError("wrong token")
        return sock, None

    return authenticate


def serve(config: WorkerConfig) -> None:
    """Serve until killed. Raises ``PlatformError`` if the platform cannot start."""
    worker = _Worker(config)
    server = ThreadedServer(make_service(worker), hostname=config.host, port=config.port,
                            authenticator=_authenticator(config.token), protocol_config=SERVER_CONFIG,
                            logger=_quiet_logger())
    if config.watch_stdin:
        threading.Thread(target=_exit_on_stdin_eof, daemon=True).start()
    server._listen()  # listen before announcing: rpyc binds in __init__ but listens in start(); idempotent
    if config.announce:
        print(f"{READY} {config.host} {server.port}", flush=True)
    else:
        print(f"tapml worker: {worker.platform.name} on {config.host}:{server.port}"
              f"{' (token required)' if config.token else ''}", file=sys.stderr, flush=True)
    server.start()


def _exit_on_stdin_eof() -> None:
    try:
        while sys.stdin.buffer.read(1):
            pass
    finally:
        os._exit(0)


def _quiet_logger():
    import logging

    logger = logging.getLogger("tapml.worker")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


def main(argv: list[str] | None = None) -> int:
    """Internal entry (``python -m tapml.remote.worker CONFIG_JSON``) for spawned workers."""
    args = sys.argv[1:] if argv is None else argv
    config = WorkerConfig(**json.loads(args[0]))
    config.token = os.environ.pop("TAPML_WORKER_TOKEN", config.token)
    try:
        serve(config)
    except PlatformError as e:
        print(f"tapml worker: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

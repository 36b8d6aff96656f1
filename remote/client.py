"""``RemoteTarget``: the client-side proxy that *is* a ``Target`` (the engine-facing interface).

The engine calls ``prepare``/``execute`` as on any platform; ``prepare`` is a
JSON call over rpyc, ``execute`` one binary call frame on the data channel (an
op the worker has planned, inputs whole tensors: ``calls``), else a JSON run
frame plus tensor frames. Tensors the worker
already holds (weights, repeated activations) are referenced by content hash,
not resent. Every call has a timeout; a worker that dies or hangs costs the op
in flight (``WorkerCrashed``/``WorkerTimeout``), then the client respawns its
local worker or reconnects to the remote one and carries on.
"""

from __future__ import annotations

import itertools
import json
import secrets
import select
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import rpyc
import torch
from rpyc.core.async_ import AsyncResultTimeout

from tapml.core import HashMemo, OpCall, OpFailed, Status, UnitCall, byte_view
from tapml.platforms import Capabilities, PlatformError, Support, Target, Unsupported

from .calls import MAX_INPUTS, MAX_MODULE, MAX_NDIM, call_head, input_entry, names_entry, read_outputs, view_entry
from .spawn import SpawnedWorker, spawn_worker
from .wire import MAX_RELEASE, FrameReader, WireError, frame_buffers, send_buffers, tensor_buffers

__all__ = ["RemoteTarget", "TargetLost", "WorkerCrashed", "WorkerTimeout", "PayloadTooLarge", "parse_address"]

CLIENT_CONFIG = {"allow_public_attrs": False, "allow_pickle": False, "sync_request_timeout": 30}
# runs sent and not yet answered: their frames stay under what the worker's receive buffer takes unread
# (so sending never blocks while the worker is blocked sending answers no one reads yet: no deadlock);
# their answers under what the client is willing to hold at once
FLIGHT_REQUEST_BYTES = 32 << 10
FLIGHT_ANSWER_BYTES = 64 << 20
RELEASE_EVERY = 64  # names of read answers released to the worker at once, with the next run sent

Named = Callable[[torch.Tensor], "str | None"]  # the name of a pending output a tensor is (a view of), or None


class WorkerCrashed(OpFailed):
    """The worker died (or its connection broke) while it held the op."""

    def __init__(self, message: str):
        super().__init__(message, Status.CRASHED)


class WorkerTimeout(OpFailed):
    """No answer within the op's timeout."""

    def __init__(self, message: str):
        super().__init__(message, Status.TIMEOUT)


class TargetLost(OpFailed):
    """The worker is gone for good: nothing more can run on it in this run."""

    def __init__(self, message: str):
        super().__init__(message, Status.CRASHED, fatal=True)


class PayloadTooLarge(OpFailed):
    """A tensor over the worker's payload cap."""

    def __init__(self, message: str):
        super().__init__(message, Status.CRASHED)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise PlatformError(f"--remote {address!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class RemoteTarget(Target):
    """A platform hosted by a worker process: spawned here (``spawn=NAME``) or at ``address``."""

    def __init__(self, address: str | None = None, *, spawn: str | None = None, token: str | None = None,
                 timeout: float = 60.0, compile_timeout: float = 600.0, connect_timeout: float = 10.0,
                 reconnect_s: float = 30.0, spawn_options: dict | None = None, pipeline: bool = True):
        if (address is None) == (spawn is None):
            raise PlatformError("give either a worker address or a platform to spawn")
        self.timeout, self.compile_timeout = timeout, compile_timeout
        self.pipelines = pipeline  # per-op runs sent before the last is answered (``send_run``)
        self.connect_timeout, self.reconnect_s = connect_timeout, reconnect_s
        self._spawn_name, self._spawn_options = spawn, spawn_options or {}
        self._worker: SpawnedWorker | None = None
        self._address = parse_address(address) if address else None
        self._token = token or ""
        self._memo = HashMemo()
        self._lock = threading.RLock()  # one op in flight per data socket
        self._support: dict[str, Support] = {}
        self._stats: Counter = Counter()
        self._conn = None
        self._generation = 0  # bumped by every (re)connection: answers in flight on an older one never come
        self._flight: deque = deque()  # (op, generation, sending, request bytes, answer bytes, names), oldest first
        self._released: list[str] = []  # names of outputs whose answers were read, not yet released to the worker
        self._flight_bytes = [0, 0]  # requests, answers
        self._name_prefix, self._name_count = secrets.token_bytes(8), itertools.count()
        self.restarts = 0
        self.events: list[dict] = []  # crashes, timeouts and what became of the worker after each
        self.lost: str | None = None
        self._connect()

    # -- connection ------------------------------------------------------------------
    @property
    def address(self) -> str:
        host, port = self._address
        return f"{host}:{port}"

    def _connect(self) -> None:
        if self._spawn_name is not None:
            self._worker = spawn_worker(self._spawn_name, **self._spawn_options)
            self._address, self._token = (self._worker.host, self._worker.port), self._worker.token
        host, port = self._address
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
            sock.sendall(f"TAPML1 {self._token}\n".encode())
            sock.settimeout(None)
            conn = rpyc.utils.factory.connect_stream(rpyc.SocketStream(sock), config=dict(
                CLIENT_CONFIG, sync_request_timeout=self.connect_timeout))
            info = json.loads(conn.root.hello())
        except (OSError, EOFError) as e:
            raise PlatformError(f"cannot reach the worker at {host}:{port}: {e or 'connection closed'} "
                                "(is it running? is the token right?)") from None
        conn._config["sync_request_timeout"] = self.timeout
        data = socket.create_connection((host, info["data_port"]), timeout=self.connect_timeout)
        data.settimeout(None)
        data.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data.sendall(f"TAPMLDATA {info['nonce']}\n".encode())
        self._conn, self._data, self.info = conn, data, info
        self._reader = FrameReader(data)
        self._known: set[str] = set()  # tensor keys the worker holds for this session
        self._sent_ops: set[str] = set()  # signatures the worker has the OpCall for
        self._handles: dict[str, int] = {}  # signature -> the worker's plan for it (binary call frames)
        self._data_timeout: float | None = None
        self._generation += 1
        self._flight_bytes = [0, 0]
        self._released = []
        self.name = info["platform"]
        self.description = info["description"]

    def _drop(self) -> str:
        """Close the connection (and a spawned worker); returns the tail of that worker's log."""
        for closer in (getattr(self._conn, "close", None), getattr(getattr(self, "_data", None), "close", None)):
            try:
                if closer:
                    closer()
            except Exception:
                pass
        self._conn = None
        tail = ""
        if self._worker is not None:
            tail = self._worker.log_tail() if self._worker.proc.poll() not in (None, 0) else ""
            self._worker.stop()
            self._worker = None
        return tail

    def _recover(self, op: OpCall | None, what: str) -> str:
        """After a crash or hang: a fresh spawned worker, or one bounded attempt to reconnect to the
        remote one. Returns what happened, for the error message; a target that cannot be reached
        again is *lost*: every later call fails at once instead of trying again."""
        tail = self._drop()
        event = {"op": op.index if op is not None else None, "what": what}
        if tail:
            event["log"] = tail
        deadline = time.monotonic() + self.reconnect_s
        while True:
            try:
                self._connect()
                break
            except PlatformError as e:
                if self._spawn_name is not None or time.monotonic() > deadline:
                    self.lost = f"the worker could not be reached again after it {what} ({e})"
                    self.events.append(dict(event, recovery="lost"))
                    return "it could not be reached again: the remaining ops stay on the reference"
                time.sleep(0.2)  # a supervised worker is restarting; bounded by reconnect_s
        self.restarts += 1
        recovery = "respawned" if self._spawn_name is not None else "reconnected"
        self.events.append(dict(event, recovery=recovery))
        return ("a fresh worker was spawned" if self._spawn_name is not None
                else "reconnected to it (restarted by its supervisor)")

    def _check_alive(self) -> None:
        if self.lost is not None:
            raise TargetLost(self.lost)
        if self._conn is None:
            raise TargetLost("the worker connection is closed")

    def _failed(self, op: OpCall | None, e: BaseException, elapsed: float | None = None) -> OpFailed:
        """The error for an op whose worker died or hung, after recovering (or losing) the worker."""
        limit = self.info.get("kernel_timeout") if getattr(self, "info", None) else None
        if isinstance(e, (TimeoutError, AsyncResultTimeout)):
            recovery = self._recover(op, "timed out")
            return WorkerTimeout(f"no answer from the worker within {self.timeout:.0f}s; {recovery}")
        if limit and elapsed is not None and elapsed >= 0.9 * limit:
            recovery = self._recover(op, "timed out")
            return WorkerTimeout(f"the kernel ran past the worker's --kernel-timeout of {limit:.0f}s and its "
                                 f"supervisor stopped it; {recovery}")
        recovery = self._recover(op, "crashed")
        tail = self.events[-1].get("log") if self.events else None
        return WorkerCrashed(f"the worker died ({type(e).__name__}: {e or 'connection closed'})"
                             + (f" [its log: {tail}]" if tail else "") + f"; {recovery}")

    def _call(self, method: str, *args, timeout: float, op: OpCall | None = None) -> dict:
        """A control call over rpyc, bounded by ``timeout``."""
        self._check_alive()
        try:
            result = rpyc.async_(getattr(self._conn.root, method))(*args)
            result.set_expiry(timeout)
            return json.loads(result.value)
        except (AsyncResultTimeout, EOFError, OSError, WireError) as e:
            raise self._failed(op, e) from None

    # -- the Platform interface ------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return Capabilities.from_json(self.info["capabilities"])

    @property
    def stats(self) -> Counter:
        return Counter(self._stats)

    def prepare(self, op: OpCall) -> Support:
        known = self._support.get(op.signature)
        if known is not None:
            self._stats["cache_hits"] += 1
            return known
        with self._lock:
            reply = self._call("prepare", op.dumps(), timeout=self.compile_timeout, op=op)
        support = Support(reply["ok"], reply.get("reason", ""))
        if support:
            self._sent_ops.add(op.signature)  # the worker keeps what it prepared
            self._plan(op.signature, reply)
        self._support[op.signature] = support
        return support

    def _plan(self, signature: str, reply: dict) -> None:
        handle = reply.get("handle")
        if isinstance(handle, int) and not isinstance(handle, bool) and 0 <= handle < 1 << 32:
            self._handles[signature] = handle

    def execute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with self._lock:
            support = self.prepare(op)
            if not support:
                raise Unsupported(support.reason)
            outputs, reply = self._run(op, inputs)
            if reply.get("error") in ("missing", "unknown-op", "unknown-handle"):  # evicted or restarted: once more
                self._known.difference_update(reply.get("keys", ()))
                self._sent_ops.discard(op.signature)
                self._handles.pop(op.signature, None)
                outputs, reply = self._run(op, inputs)
            return self._answer(outputs, reply, "runs")

    def _answer(self, outputs: list[torch.Tensor], reply: dict, counter: str) -> list[torch.Tensor]:
        """The outputs of a run frame's answer, or the error it stands for."""
        if not reply["ok"]:
            if reply["error"] == "unsupported":
                raise Unsupported(reply["message"])
            if reply["error"] == "refused":
                raise PayloadTooLarge(reply["message"])
            if reply["error"] == "malformed":
                raise OpFailed(f"the worker refused the op as malformed: {reply.get('message')}")
            raise OpFailed(f"the kernel failed on the worker: {reply.get('message', reply['error'])}")
        self._stats[counter] += 1
        self._stats["kernel_us"] += int(reply["kernel_s"] * 1e6)
        return outputs

    # -- compiled units: prepared over rpyc like an op, run by a run_unit frame ------------
    def prepare_unit(self, unit: UnitCall) -> Support:
        return self._unit_support(unit, lambda: self._prepare_unit(unit))

    def _prepare_unit(self, unit: UnitCall) -> Support:
        with self._lock:
            reply = self._call("prepare_unit", unit.dumps(), timeout=self.compile_timeout)
        return Support(reply["ok"], reply.get("reason", ""))

    def execute_unit(self, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with self._lock:
            for attempt in range(2):
                support = self.prepare_unit(unit)
                if not support:
                    raise Unsupported(support.reason)
                self._check_alive()
                buffers: list = []
                sending: dict[str, int] = {}
                header = {"kind": "run_unit", "sig": unit.signature, "index": unit.index, "module": unit.module,
                          "call": unit.call, "keys": self._upload(inputs, buffers, sending)}
                outputs, reply = self._exchange(header, None, buffers, sending)
                if attempt == 0 and reply.get("error") in ("missing", "unknown-unit"):  # evicted or restarted
                    self._known.difference_update(reply.get("keys", ()))
                    self._support.pop("unit:" + unit.signature, None)
                    continue
                break
            return self._answer(outputs, reply, "unit_runs")

    def _run(self, op: OpCall, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """One run of ``op`` and its answer, on the data socket, under the op timeout: a binary call frame
        when the worker has a plan for it and every input is a whole tensor, else a JSON run frame."""
        self._check_alive()
        if self._flight:
            raise PlatformError("tapml: a run was sent while pipelined runs are unanswered (receive_run them first)")
        buffers: list = []
        sending: dict[str, int] = {}
        handle = self._handles.get(op.signature)
        if handle is not None and self._call_frame(handle, op, inputs, buffers, sending):
            outputs, reply = self._exchange(None, op, buffers, sending)
            if not reply["ok"]:  # a refused call's inline inputs may not have been kept
                self._known.difference_update(sending)
            return outputs, reply
        buffers.clear()
        sending.clear()
        keys = self._upload(inputs, buffers, sending)
        header = {"kind": "run", "sig": op.signature, "index": op.index, "module": op.module, "call": op.call,
                  "keys": keys}
        if op.signature not in self._sent_ops:
            header["op"] = op.to_json()
        outputs, reply = self._exchange(header, op, buffers, sending)
        self._plan(op.signature, reply)
        return outputs, reply

    def _call_frame(self, handle: int, op: OpCall, inputs: list[torch.Tensor], buffers: list,
                    sending: dict[str, int], named: Named | None = None, names: list[str] | None = None) -> bool:
        """A binary call frame into ``buffers``: each input by key when the worker holds it (or by the name
        of a pending output, ``named``), a view of a held tensor by its key and geometry, else inline;
        ``names`` for its outputs. False when an input is a view of memory the worker lacks (the JSON frames
        send the window or its base)."""
        module = op.module.encode()
        if len(inputs) > MAX_INPUTS or len(module) > MAX_MODULE:
            return False
        buffers.append(call_head(handle, op.index, op.call, module, len(inputs), named=names is not None))
        reused = 0
        for t in inputs:  # not detached: the memo needs the caller's version counter
            nbytes = t.numel() * t.element_size()
            if t.is_conj() or t.is_neg():
                return False
            name = named(t) if named is not None else None
            if (not t.is_contiguous() or t.storage_offset()
                    or (nbytes and t.untyped_storage().nbytes() != nbytes)):
                entry = self._view_entry(t, name)
                if entry is None:
                    return False
                buffers.append(entry)
                continue
            if name is not None:
                buffers.append(input_entry(True, bytes.fromhex(name), 0))
                continue
            view = byte_view(t) if nbytes else None  # hashed and sent from the same bytes
            key = self._memo.key(t, t, view=view)
            try:
                digest = bytes.fromhex(key)
            except ValueError:  # a key the worker named otherwise (the JSON frames carry any string)
                return False
            if len(digest) != 16:
                return False
            if key in self._known or key in sending:
                reused += nbytes
                buffers.append(input_entry(True, digest, 0))
                continue
            self._check_cap(nbytes)
            buffers.append(input_entry(False, digest, nbytes))
            if nbytes:
                buffers.append(view)
            sending[key] = nbytes
        if names is not None:
            buffers.append(names_entry([bytes.fromhex(n) for n in names]))
        self._stats["bytes_reused"] += reused
        return True

    def _view_entry(self, t: torch.Tensor, name: str | None) -> bytes | None:
        """``t`` as a view of a tensor the worker holds (a pending output ``name``, else the storage it views
        when the worker holds that by key), or None."""
        if t.dim() > MAX_NDIM or not t.numel():
            return None
        if name is None:
            numel = t.untyped_storage().nbytes() // t.element_size()
            base = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (numel,), (1,))
            name = self._memo.peek(t, base)
            if name is None or name not in self._known:
                return None
        try:
            digest = bytes.fromhex(name)
        except ValueError:
            return None
        if len(digest) != 16:
            return None
        self._stats["bytes_reused"] += t.numel() * t.element_size()
        return view_entry(digest, t.storage_offset(), t.stride())

    def _exchange(self, header: dict | None, op: OpCall | None, buffers: list, sending: dict[str, int]
                  ) -> tuple[list[torch.Tensor], dict]:
        """Send a run frame (``header``; None: ``buffers`` hold a binary call frame); receive the outputs:
        a binary outputs frame, or output tensor frames and the reply."""
        start = time.monotonic()
        try:
            self._post(header, op, buffers, sending)
            return self._answers()
        except (OSError, WireError, ValueError) as e:  # TimeoutError is an OSError
            raise self._failed(op, e, time.monotonic() - start) from None

    def _post(self, header: dict | None, op: OpCall | None, buffers: list, sending: dict[str, int]) -> None:
        """Inputs and run frame in one write."""
        if self._data_timeout != self.timeout:
            self._data.settimeout(self.timeout)
            self._data_timeout = self.timeout
        send_buffers(self._data, buffers if header is None else buffers + frame_buffers(header))
        self._known.update(sending)
        self._stats["bytes_sent"] += sum(sending.values())
        if op is not None and header is not None:
            self._sent_ops.add(op.signature)

    def _answers(self, into: list | None = None) -> tuple[list[torch.Tensor], dict]:
        """One run's answer: a binary outputs frame (``into``: see ``read_outputs``), or output tensor frames
        and the reply."""
        outputs = []
        binary = read_outputs if into is None else lambda r, magic, cap: read_outputs(r, magic, cap, into)
        while True:
            frame, t = self._reader.read(binary=binary)
            kind = frame.get("kind")
            if kind == "outputs":
                for key, t in frame["outputs"]:
                    outputs.append(self._received(key, t))
                return outputs, frame
            if kind == "reply":
                return outputs, frame
            outputs.append(self._received(frame["key"], t))

    # -- pipelined runs: sent before the last one is answered ------------------------------
    pipelines = True
    copies_inputs = True  # inputs are sent (or found on the worker by key): never written, kept only weakly

    def send_run(self, op: OpCall, inputs: list[torch.Tensor], named: Named) -> list[str] | None:
        """Send a run of ``op`` without waiting for its answer (``receive_run`` reads answers in order).
        Inputs that are (views of) outputs still on their way are taken by name (``named``); the names of
        this run's outputs are returned. None — nothing sent — when the op has not been prepared here, or
        the frame or its answer would take the runs in flight past their bounds: answer those first."""
        support = self._support.get(op.signature)
        if not support or self.lost is not None or self._conn is None:
            return None
        names = self._names(len(op.output_specs))
        buffers: list = []
        sending: dict[str, int] = {}
        handle = self._handles.get(op.signature)
        header = None
        if handle is None or not self._call_frame(handle, op, inputs, buffers, sending, named, names):
            buffers.clear()
            sending.clear()
            header = {"kind": "run", "sig": op.signature, "index": op.index, "module": op.module, "call": op.call,
                      "keys": self._upload(inputs, buffers, sending, named), "names": names}
            if op.signature not in self._sent_ops:
                header["op"] = op.to_json()
            buffers += frame_buffers(header)
        if not self._dispatch(op, buffers, sending, names):
            return None
        if header is not None:
            self._sent_ops.add(op.signature)
        return names

    def send_unit(self, unit: UnitCall, inputs: list[torch.Tensor], named: Named) -> list[str] | None:
        """``send_run`` for a prepared unit: its answer is read by ``receive_run`` in turn; None — nothing
        sent — when the unit has not been prepared here or the runs in flight are at their bounds."""
        support = self._support.get("unit:" + unit.signature)
        if not support or self.lost is not None or self._conn is None:
            return None
        names = self._names(len(unit.output_specs))
        buffers: list = []
        sending: dict[str, int] = {}
        header = {"kind": "run_unit", "sig": unit.signature, "index": unit.index, "module": unit.module,
                  "call": unit.call, "keys": self._upload(inputs, buffers, sending, named), "names": names}
        buffers += frame_buffers(header)
        return names if self._dispatch(unit, buffers, sending, names) else None

    def _names(self, n: int) -> list[str]:
        return [(self._name_prefix + next(self._name_count).to_bytes(8, "little")).hex() for _ in range(n)]

    def _dispatch(self, call: OpCall | UnitCall, buffers: list, sending: dict[str, int], names: list[str]) -> bool:
        """Post a run's frames (after any release frames due) unless the runs in flight would pass their
        bounds; False when nothing was sent."""
        release = self._release()
        buffers = release + buffers  # counted in flight like the run: the worker reads them first
        size = sum(memoryview(b).nbytes for b in buffers)
        answer = sum(s.nbytes for s in call.output_specs)
        if self._flight and (self._flight_bytes[0] + size > FLIGHT_REQUEST_BYTES
                             or self._flight_bytes[1] + answer > FLIGHT_ANSWER_BYTES):
            return False
        with self._lock:
            try:
                self._post(None, call, buffers, sending)
            except (OSError, WireError):  # the worker died on a run in flight: reading its answer says which
                return False
        if release:
            self._released = []
        self._flight.append((call, self._generation, sending, size, answer, names))
        self._flight_bytes[0] += size
        self._flight_bytes[1] += answer
        self._stats["runs_pipelined"] += 1
        return True

    def _release(self) -> list:
        """Release frames for the names of answers already read, once there are ``RELEASE_EVERY`` of them
        (sent with the next run: no extra round trip), else nothing; ``_released`` is emptied once they are
        sent. Without them the worker would hold every pending output it ever named, each forward's until its
        cache budget (4 GiB) evicted them."""
        names = self._released
        if len(names) < RELEASE_EVERY:
            return []
        return [b for at in range(0, len(names), MAX_RELEASE)
                for b in frame_buffers({"kind": "release", "names": names[at:at + MAX_RELEASE]})]

    @property
    def in_flight(self) -> int:
        return len(self._flight)

    def receive_run(self, into: list | None = None
                    ) -> tuple[list[torch.Tensor] | None, OpFailed | Unsupported | None, float]:
        """The answer to the oldest run in flight: ``(outputs, None, kernel seconds)``, ``(None, error, 0)``,
        or ``(None, None, 0)`` when no answer will come (the worker was replaced since: run it again).
        ``into``: tensors to receive the outputs in (its placeholders), where dtype and shape allow."""
        op, generation, sending, size, answer, names = self._flight.popleft()
        if generation != self._generation:  # counted on a connection since replaced (its counts were reset)
            return None, None, 0.0
        if self.info.get("releases"):  # from now on this client takes these outputs by content key, if at all
            self._released += names
        self._flight_bytes[0] -= size
        self._flight_bytes[1] -= answer
        start = time.monotonic()
        with self._lock:
            try:
                outputs, reply = self._answers(into)
            except (OSError, WireError, ValueError) as e:
                return None, self._failed(op, e, time.monotonic() - start), 0.0
        if not reply["ok"]:  # inline inputs of a refused run may not have been kept; evicted ones are not held
            self._known.difference_update(sending)
            self._known.difference_update(k for k in reply.get("keys", ()) if isinstance(k, str))
            if reply.get("error") in ("missing", "unknown-op", "unknown-unit", "unknown-handle", "malformed"):
                return None, None, 0.0  # an input by name that never came (or was evicted): run it again
        unit = isinstance(op, UnitCall)
        if not unit:
            self._plan(op.signature, reply)
        try:
            outputs = self._answer(outputs, reply, "unit_runs" if unit else "runs")
            return outputs, None, float(reply.get("kernel_s", 0.0))
        except (Unsupported, OpFailed) as e:
            return None, e, 0.0

    def answer_ready(self) -> bool:
        if not self._flight:
            return False
        if self._flight[0][1] != self._generation or self._reader.pending():
            return True
        try:
            return bool(select.select([self._data], [], [], 0)[0])
        except (OSError, ValueError):  # a closed socket: reading it says what happened
            return True

    def adopt(self, live: torch.Tensor, received: torch.Tensor) -> None:
        """``live`` now holds ``received``'s values (a filled placeholder): the worker holds them by this key."""
        key = self._memo.peek(received, received)
        if (key is not None and live.dtype == received.dtype and live.shape == received.shape
                and live.is_contiguous() and not live.storage_offset()):
            self._memo.remember(live, key)

    def content_key(self, output: torch.Tensor) -> str | None:
        """The key the worker gave ``output`` (``_keep`` hashes exactly the bytes it sends), while ``output``
        is unchanged (tapml's own writes inside the dispatch mode bump its version: ``core.overwrite``); None
        for a view of other memory (strided, conjugate, negative) or one written since."""
        if not output.is_contiguous() or output.is_conj() or output.is_neg():
            return None
        return self._memo.peek(output, output)

    def _received(self, key: str, t: torch.Tensor) -> torch.Tensor:
        self._known.add(key)  # the worker keeps its outputs by this key
        self._memo.remember(t, key)
        self._stats["bytes_received"] += t.numel() * t.element_size()
        return t

    def _upload(self, inputs: list[torch.Tensor], buffers: list, sending: dict[str, int],
                named: Named | None = None) -> list:
        """Input references for a run frame; the tensor frames of what the worker lacks go into ``buffers``
        (their keys and sizes into ``sending``), to travel with the run frame.

        A strided view whose memory is (mostly) one storage travels as that storage
        plus shape/stride/offset, so a transposed weight or a view of a target output
        is never copied, hashed or sent again. A (view of a) pending output, ``named``, travels as its
        name (and the view's geometry: the worker holds that output contiguous, as its placeholder is)."""
        refs = []
        for t in inputs:  # not detached: the memo needs the caller's version counter
            name = named(t) if named is not None else None
            if name is not None:
                whole = t.is_contiguous() and not t.storage_offset() and t.nbytes == t.untyped_storage().nbytes()
                refs.append(name if whole else {"base": name, "shape": list(t.shape), "stride": list(t.stride()),
                                                "offset": t.storage_offset()})
                continue
            if t.is_conj() or t.is_neg():  # the bit is not in the storage: send the values it stands for
                t = t.resolve_conj().resolve_neg()
            storage_numel = t.untyped_storage().nbytes() // t.element_size() if t.numel() else 0
            whole = t.is_contiguous() and t.storage_offset() == 0 and t.numel() == storage_numel
            base = None
            if not whole and t.numel():
                base = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (storage_numel,), (1,))
                if storage_numel > 2 * t.numel() and self._memo.peek(t, base) not in self._known:
                    base = None  # a small window into a big unknown buffer: send just the window
            if base is not None:
                key = self._send(t, base, buffers, sending)
                refs.append({"base": key, "shape": list(t.shape), "stride": list(t.stride()),
                             "offset": t.storage_offset()})
            else:
                refs.append(self._send(t, t.contiguous().reshape(-1), buffers, sending))
        return refs

    def _send(self, t: torch.Tensor, flat: torch.Tensor, buffers: list, sending: dict[str, int]) -> str:
        """Queue ``flat`` (``t``'s memory) unless the worker holds it or it is already queued; its key."""
        key = self._memo.key(t, flat)
        nbytes = flat.numel() * flat.element_size()
        if key in self._known or key in sending:
            self._stats["bytes_reused"] += nbytes
            return key
        self._check_cap(nbytes)
        frame, _ = tensor_buffers(key, flat)
        buffers += frame
        sending[key] = nbytes
        return key

    def _check_cap(self, nbytes: int) -> None:
        cap = self.info["max_payload"]
        if nbytes > cap:
            raise PayloadTooLarge(f"a {nbytes}-byte tensor exceeds the worker's payload cap of {cap} "
                                  "bytes (tapml worker --max-payload)")

    def worker_stats(self) -> dict[str, Any]:
        return self._call("stats", timeout=self.timeout)

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "available": True, "reason": "",
                "capabilities": self.capabilities().to_json(), "address": self.address,
                "worker_pid": self.info.get("pid")}

    def close(self) -> None:
        self._drop()


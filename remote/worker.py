"""The worker: one platform served over rpyc (service mode) plus a raw data channel.

Control calls (hello, prepare, stats) are the ``exposed_`` methods below and
nothing else is reachable: no classic mode, no public attributes, no pickle;
every reply is a JSON string, so nothing crosses as a remote object. Running an
op happens on the client's data socket (``wire``).

What a client can make it do is bounded: a token (the first line on each
socket, within a total deadline) guards both channels; unauthenticated
connections are capped and the accept loops survive running out of file
descriptors; op names resolve only through ``tapml.core``'s allow-list, ops
that touch RNG state or return uninitialized memory are refused, and an op's
outputs are sized on the meta device before it runs; malformed frames get an
error reply and the worker stays up.
"""

from __future__ import annotations

import copy
import errno
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import rpyc
import torch
from rpyc.utils.authenticators import AuthenticationError
from rpyc.utils.server import ThreadedServer

from tapml.core import (
    OpCall,
    OpRefused,
    TapmlError,
    UnitCall,
    bind_args,
    byte_view,
    content_digest,
    flatten_outputs,
    remote_refusal,
)
from tapml.platforms import PlatformError, Support, Unsupported, open_local

from .calls import output_buffers, read_call
from .wire import (
    MAX_RELEASE,
    FrameError,
    FrameReader,
    WireError,
    check_run,
    frame_buffers,
    read_preamble,
    send_buffers,
    tensor_buffers,
)

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
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass
class WorkerConfig:
    platform: str
    host: str = "127.0.0.1"
    port: int = 0
    token: str = ""
    max_payload: int = 1 << 30  # bytes per tensor (also per op output, sized before the op runs)
    cache_bytes: int = 4 << 30  # uploaded tensors kept for reuse by hash
    max_clients: int = 64  # sessions at once
    max_pending: int = 32  # connections still in their preamble
    preamble_s: float = 5.0  # the whole preamble line must arrive within this
    frame_s: float = 120.0  # a frame once begun must keep arriving: no chunk may take longer than this
    kernel_timeout: float | None = None  # a supervisor's limit, advertised so clients can name a timeout
    announce: bool = False  # print READY with the port on stdout (for a spawning parent)
    watch_stdin: bool = False  # exit when stdin closes (the spawning parent died)
    watchdog_fd: int | None = None  # report op start/end and heartbeats to a supervisor

    def dumps(self) -> str:
        return json.dumps(asdict(self))


class TensorCache:
    """One client's uploaded tensors by content key; least recently used evicted past a byte budget."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def put(self, key: str, t: torch.Tensor, replace: bool = False) -> None:
        """Hold ``t`` under ``key``; a content key already held keeps its tensor (same bytes), a name given
        by the client (``replace``) is rebound."""
        if key in self._items:
            if not replace:
                return
            self.used -= self._items.pop(key).nbytes
        self._items[key] = t
        self.used += t.nbytes
        while self.used > self.budget and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.used -= old.nbytes

    def get(self, key: str) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is not None:
            self._items.move_to_end(key)
        return t

    def drop(self, key: str) -> None:
        """Let go of ``key`` (a name the client has released); an unknown key is ignored."""
        t = self._items.pop(key, None)
        if t is not None:
            self.used -= t.nbytes


def _accept(listener: socket.socket, alive) -> socket.socket | None:
    """One connection, riding out a full file-descriptor table instead of dying (None: shut down)."""
    warned = False
    delay = 0.01
    while alive():
        try:
            sock, _ = listener.accept()
            return sock
        except TimeoutError:
            continue
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN, errno.ECONNABORTED):
                continue
            if e.errno in _OUT_OF_FDS:
                if not warned:
                    print(f"tapml worker: out of file descriptors ({e.strerror}); refusing connections until "
                          "some close", file=sys.stderr, flush=True)
                    warned = True
                time.sleep(delay)  # back off; connections close on their preamble deadline
                delay = min(delay * 2, 0.5)
                continue
            return None  # the listener was closed
    return None


class _Worker:
    """Process-wide state shared by every connection."""

    def __init__(self, config: WorkerConfig):
        if not config.token:
            raise PlatformError("a worker needs a token (tapml worker generates one when --token-file is not given)")
        self.config = config
        self.platform = open_local(config.platform)
        self.sessions: dict[str, _Session] = {}
        self.lock = threading.Lock()  # platforms compile and keep caches: one call at a time
        self.pending: dict[socket.socket, float] = {}  # connections still in their preamble, since when
        self._pending_lock = threading.Lock()
        self.admitted: dict[str, Support] = {}  # per op signature: the worker's own checks, before compiling
        self.watchdog = os.fdopen(config.watchdog_fd, "w", buffering=1) if config.watchdog_fd is not None else None
        self.data = socket.create_server((config.host, 0))
        self.alive = True
        threading.Thread(target=self._accept_data, name="tapml-data-accept", daemon=True).start()
        if self.watchdog is not None:
            threading.Thread(target=self._heartbeat, name="tapml-heartbeat", daemon=True).start()

    def beat(self, what: str) -> None:
        if self.watchdog is not None:
            try:
                self.watchdog.write(what + "\n")
            except (OSError, ValueError):
                pass

    def _heartbeat(self) -> None:
        """Tell the supervisor this process is alive between kernels too (a stopped process goes quiet)."""
        while self.alive:
            self.beat("H")
            time.sleep(0.5)

    def gate(self, sock: socket.socket) -> None:
        """Admit a new connection to its preamble; when too many are pending, cut the oldest.

        A real client sends its preamble at once and leaves this state within a millisecond,
        so evicting the oldest pending connection starves idle or slow-dripping ones, not it."""
        with self._pending_lock:
            if len(self.pending) >= self.config.max_pending:
                oldest = min(self.pending, key=self.pending.get)
                del self.pending[oldest]
                try:
                    oldest.shutdown(socket.SHUT_RDWR)  # its reader wakes up and closes it
                except OSError:
                    pass
            self.pending[sock] = time.monotonic()

    def ungate(self, sock: socket.socket) -> None:
        with self._pending_lock:
            self.pending.pop(sock, None)

    def _accept_data(self) -> None:
        while True:
            sock = _accept(self.data, lambda: self.alive)
            if sock is None:
                return
            self.gate(sock)
            threading.Thread(target=self._attach, args=(sock,), daemon=True).start()

    def _attach(self, sock: socket.socket) -> None:
        try:
            line = read_preamble(sock, deadline_s=self.config.preamble_s)
        except (OSError, WireError):
            sock.close()
            return
        finally:
            self.ungate(sock)
        kind, _, nonce = line.partition(" ")
        session = self.sessions.get(nonce) if kind == "TAPMLDATA" else None
        if session is None or not session.claim(sock):  # one data socket per session
            sock.close()
            return
        session.serve(sock)

    def admit(self, op: OpCall) -> Support:
        """The worker's own checks before a platform sees an op: what it may run for a client."""
        known = self.admitted.get(op.signature)
        if known is None:
            known = self.admitted[op.signature] = _admit(op, self.config.max_payload)
        return known

    def prepare(self, op: OpCall) -> Support:
        admitted = self.admit(op)
        if not admitted:
            return admitted
        return self._busy(lambda: self.platform.prepare(op))


    def prepare_unit(self, unit: UnitCall) -> Support:
        """A whole unit: every node passes the op checks (allow-list, no RNG, no uninitialized memory,
        bounded outputs), then the platform compiles it."""
        for call in unit.calls:
            admitted = self.admit(call)
            if not admitted:
                return Support.no(f"node {call.index} ({call.op}): {admitted.reason}")
        return self._busy(lambda: self.platform.prepare_unit(unit))

    def _busy(self, work: Callable[[], Support]) -> Support:
        """``work`` under the worker's lock, bracketed for the supervisor's watchdog (B: begun, E: ended)."""
        with self.lock:
            self.beat("B")
            try:
                return work()
            finally:
                self.beat("E")


def _admit(op: OpCall, max_payload: int) -> Support:
    why = remote_refusal(op.op)
    if why:
        return Support.no(why)
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:  # size the outputs with fake tensors: a creation op cannot make the worker allocate without bound
        with FakeTensorMode(), torch.no_grad():
            fakes = [torch.empty_strided(s.shape, s.stride, dtype=s.torch_dtype) for s in op.inputs]
            args, kwargs = bind_args(op, fakes)
            outputs = flatten_outputs(op.func(*args, **kwargs))
    except Exception:  # data-dependent or fake-less ops: their outputs are bounded by their inputs
        return Support.yes()
    biggest = max((o.numel() * o.element_size() for o in outputs), default=0)
    if biggest > max_payload:
        return Support.no(f"an output would take {biggest} bytes, over the worker's payload cap of {max_payload}")
    return Support.yes()


def _placed(op: OpCall, index: int, module: str, call: int) -> OpCall:
    """``op`` at another place in the model (fields checked by ``check_run``): a shallow copy keeps the
    checked fields and cached properties (resolved overload, specs) that ``dataclasses.replace`` would
    validate and compute again on every run."""
    placed = copy.copy(op)
    for name, value in (("index", index), ("module", module), ("call", call)):
        object.__setattr__(placed, name, value)
    return placed


MAX_PLANS = 1 << 16  # per session; past it an op runs by JSON frames


class _Plan:
    """What a binary call of an admitted op needs: the op, its recorded place, each input's layout and the
    platform's run of it with the arguments bound once."""

    __slots__ = ("op", "place", "layout", "run")

    def __init__(self, op: OpCall, run):
        self.op, self.place, self.run = op, (op.index, op.module, op.call), run
        self.layout = [(s.torch_dtype, torch.Size(s.shape), s.numel, s.nbytes) for s in op.inputs]


class _Session:
    """One client: its data socket, its uploaded tensors and the ops it has sent."""

    def __init__(self, worker: _Worker):
        self.worker = worker
        self.nonce = secrets.token_hex(16)
        self.cache = TensorCache(worker.config.cache_bytes)
        self.refused: dict[str, str] = {}
        self.ops: dict[str, OpCall] = {}
        self.plans: list[_Plan] = []  # admitted ops by handle: what a binary call frame names
        self.plan_of: dict[str, int] = {}  # op signature -> handle
        self._plan_lock = threading.Lock()  # plans are made by prepare (rpyc thread) and by run frames
        self.units: dict[str, UnitCall] = {}  # prepared (admitted and compiled) by this client
        self.unit_calls: dict[tuple, UnitCall] = {}  # (signature, module, call, index) -> that call of the unit
        self.sock: socket.socket | None = None
        self._outgoing: list = []  # output frames of the run being answered, sent with its reply
        self._claimed = threading.Lock()

    def claim(self, sock: socket.socket) -> bool:
        return self._claimed.acquire(blocking=False)

    def plan(self, op: OpCall) -> int | None:
        """The handle of an op this worker has admitted (None past ``MAX_PLANS``, or when the platform does not
        take it: it runs by JSON frames)."""
        with self._plan_lock:
            handle = self.plan_of.get(op.signature)
            if handle is None and len(self.plans) < MAX_PLANS:
                try:
                    run = self.worker.platform.runner(op)
                except Exception:  # a platform that fails to bind it: the JSON frames say how it fails
                    run = None
                if run is None:
                    return None
                handle = self.plan_of[op.signature] = len(self.plans)
                self.plans.append(_Plan(op, run))
            return handle

    def serve(self, sock: socket.socket) -> None:
        """The data loop: store tensor frames, answer run frames, until the client goes."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        reader = FrameReader(sock)
        torch.set_grad_enabled(False)  # this thread's own mode: a worker records no autograd graph

        def binary(reader: FrameReader, magic: int, max_payload: int | None) -> dict:
            return read_call(reader, magic, max_payload, self.plans)

        try:
            while True:
                header, t = reader.read(self.worker.config.max_payload, frame_s=self.worker.config.frame_s,
                                        binary=binary)
                kind = header.get("kind")
                if kind == "call":
                    self._reply(self._call(header))
                elif kind == "tensor":
                    if t is None:
                        if isinstance(header.get("key"), str):
                            self.refused[header["key"]] = header["refused"]
                    else:
                        self.cache.put(header["key"], t)
                elif kind == "run":
                    self._reply(self._run(header))
                elif kind == "run_unit":
                    self._reply(self._run_unit(header))
                elif kind == "release":  # no reply: the client reads none
                    self._release(header.get("names"))
                else:
                    self._reply({"ok": False, "error": "malformed", "message": "unknown frame kind"})
        except (OSError, WireError):
            pass
        finally:
            self.close()

    def _release(self, names) -> None:
        """Drop the names of outputs whose answers the client has read: it takes them by content key from
        then on. Anything malformed is ignored (a release has no reply to carry an error)."""
        if isinstance(names, list) and len(names) <= MAX_RELEASE:
            for name in names:
                if isinstance(name, str):
                    self.cache.drop(name)

    def _reply(self, reply: dict | None) -> None:
        """The run's output frames and its reply (None: a binary outputs frame is the answer) in one write:
        one wakeup of the client."""
        outgoing, self._outgoing = self._outgoing, []
        if reply is not None:
            outgoing += frame_buffers({"kind": "reply", **reply})
        send_buffers(self.sock, outgoing)

    def _call(self, header: dict) -> dict | None:
        """Answer one binary call frame: a planned op on inputs held or inline, checked against the plan's
        layout (everything else was checked once, when the op was admitted)."""
        if "error" in header:
            return {"ok": False, "error": header["error"], "message": header["message"]}
        if header["index"] < -1 or header["call"] < 0:
            return {"ok": False, "error": "malformed", "message": "call: index and call must be ≥ -1 and ≥ 0"}
        plan = header["plan"]
        inputs, missing = [], []
        for (digest, t), (dtype, shape, numel, _) in zip(header["inputs"], plan.layout, strict=True):
            key = digest.hex()
            if isinstance(t, tuple):  # a view of a held tensor
                base = self.cache.get(key)
                if base is None:
                    missing.append(key)
                    continue
                t = _window(base, shape, t[1], t[0]) if base.dtype == dtype else None
                if t is None:
                    return {"ok": False, "error": "malformed", "message": f"input {key}: not a view of a held "
                            f"{dtype} tensor in its bounds"}
            elif t is not None:  # inline: read into its planned layout
                self.cache.put(key, t)
            else:
                t = self.cache.get(key)
                if t is None:
                    missing.append(key)
                    continue
                if t.dtype != dtype or t.numel() != numel:
                    return {"ok": False, "error": "malformed", "message": f"input {key} is not {dtype}{list(shape)}"}
                if t.shape != shape:
                    t = t.reshape(shape)
            inputs.append(t)
        if missing:
            return {"ok": False, "error": "missing", "keys": missing}
        op = plan.op
        if (header["index"], header["module"], header["call"]) != plan.place:
            op = _placed(op, header["index"], header["module"], header["call"])
        return self._compute(lambda: plan.run(op, inputs), binary=True, names=header.get("names"))

    def _inputs(self, header: dict, specs: list) -> tuple[list[torch.Tensor], dict | None]:
        inputs, missing = [], []
        if len(header["keys"]) != len(specs):
            return [], {"ok": False, "error": "malformed", "message": f"{len(specs)} input keys expected"}
        for ref, spec in zip(header["keys"], specs, strict=True):
            key = ref["base"] if isinstance(ref, dict) else ref
            if key in self.refused:
                return [], {"ok": False, "error": "refused", "message": self.refused[key]}
            t = self.cache.get(key)
            if t is None:
                missing.append(key)
                continue
            try:
                if isinstance(ref, dict):  # a view into a tensor the worker holds
                    view = _window(t, tuple(ref["shape"]), tuple(ref["stride"]), ref["offset"])
                    if view is None:
                        raise ValueError(f"a view {ref['shape']} {ref['stride']} +{ref['offset']} outside it")
                    inputs.append(view)
                else:
                    inputs.append(t if t.shape == spec.shape else t.reshape(spec.shape))
            except (RuntimeError, ValueError, TypeError, OverflowError) as e:
                return [], {"ok": False, "error": "malformed", "message": f"input {key[:40]}: {str(e)[:200]}"}
            if tuple(inputs[-1].shape) != spec.shape or inputs[-1].dtype != spec.torch_dtype:
                return [], {"ok": False, "error": "malformed", "message": f"input {key[:40]} is not {spec.dtype}"
                            f"{list(spec.shape)}"}
        if missing:
            return [], {"ok": False, "error": "missing", "keys": missing}
        return inputs, None

    def _run(self, header: dict) -> dict | None:
        """Answer one run frame: output tensor frames then a reply (returned), or an error reply."""
        try:
            check_run(header)
            if "op" in header:
                self.ops[header["sig"]] = OpCall.from_json(header["op"])
        except (FrameError, OpRefused) as e:
            return {"ok": False, "error": "malformed", "message": str(e)[:500]}
        except Exception as e:  # anything else a hostile op description provokes: still just an error reply
            return {"ok": False, "error": "malformed", "message": f"{type(e).__name__}: {str(e)[:300]}"}
        op = self.ops.get(header["sig"])
        if op is None:
            return {"ok": False, "error": "unknown-op"}
        op = _placed(op, header["index"], header["module"], header["call"])
        inputs, problem = self._inputs(header, op.inputs)
        if problem is not None:
            return problem
        admitted = self.worker.admit(op)
        if not admitted:
            return {"ok": False, "error": "unsupported", "message": admitted.reason}
        reply = self._compute(lambda: self.worker.platform.execute(op, inputs), names=header.get("names"))
        handle = self.plan(op) if reply["ok"] else None
        if handle is not None:  # later runs of this op can be binary call frames
            reply["handle"] = handle
        return reply

    def _run_unit(self, header: dict) -> dict | None:
        """Answer one run_unit frame: a unit this client prepared, on tensors it uploaded."""
        try:
            check_run(header)
        except FrameError as e:
            return {"ok": False, "error": "malformed", "message": str(e)[:500]}
        unit = self.units.get(header["sig"])
        if unit is None:
            return {"ok": False, "error": "unknown-unit"}
        where = (header["sig"], header["module"], header["call"], header["index"])
        if (unit.module, unit.call, unit.index) != where[1:]:  # another call of the same program (a repeated block)
            if where not in self.unit_calls:
                try:
                    self.unit_calls[where] = unit.rebind(*where[1:])
                except OpRefused as e:
                    return {"ok": False, "error": "malformed", "message": str(e)[:500]}
            unit = self.unit_calls[where]
        inputs, problem = self._inputs(header, unit.input_specs)
        if problem is not None:
            return problem
        return self._compute(lambda: self.worker.platform.execute_unit(unit, inputs), names=header.get("names"))

    def _compute(self, call, binary: bool = False, names: list[str] | None = None) -> dict | None:
        """Run a kernel (or a unit) under the worker's lock; keep its outputs by key (and output k under
        ``names[k]``, the client's name for it) and queue them to send: as one binary outputs frame
        (``binary``; returns None) or as tensor frames before a reply."""
        try:
            with self.worker.lock:
                self.worker.beat("B")
                start = time.perf_counter()
                try:
                    outputs = call()
                finally:
                    self.worker.beat("E")
                kernel_s = time.perf_counter() - start
        except Unsupported as e:
            return {"ok": False, "error": "unsupported", "message": e.reason}
        except Exception as e:  # the kernel failed (OpFailed or a platform bug): the op is lost, not the worker
            return {"ok": False, "error": "failed", "message": f"{type(e).__name__}: {str(e)[:500]}"}
        kept = [self._keep(t) for t in outputs]  # kept under their key: an output the next op reads is not resent
        for name, (_, _, t, _) in zip(names or (), kept, strict=False):
            self.cache.put(name, t, replace=True)
        if binary:
            buffers = output_buffers([(digest, t, view) for _, digest, t, view in kept], kernel_s)
            if buffers is not None:
                self._outgoing += buffers
                return None
        for key, _, t, view in kept:
            self._outgoing += tensor_buffers(key, t, view)[0]
        return {"ok": True, "kernel_s": kernel_s}

    def _keep(self, t: torch.Tensor) -> tuple[str, bytes, torch.Tensor, memoryview | None]:
        """An output in the cache under its content key, hashed from the bytes that will be sent:
        ``(key, its 16 bytes, tensor, bytes)``."""
        if t.requires_grad or t.is_conj() or t.is_neg() or not t.is_contiguous():
            t = t.detach().resolve_conj().resolve_neg().contiguous()
        view = None
        if t.numel():
            try:  # (byte_view's own first step, without checking again what was just made so)
                view = memoryview(t.numpy()).cast("B")
            except (TypeError, ValueError, RuntimeError):  # a dtype numpy lacks
                view = byte_view(t)
        digest = content_digest(t, view)
        key = digest.hex()
        self.cache.put(key, t)
        return key, digest, t, view

    def close(self) -> None:
        self.worker.sessions.pop(self.nonce, None)
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass


def _window(base: torch.Tensor, shape: tuple, stride: tuple, offset: int) -> torch.Tensor | None:
    """A strided view into held ``base`` (offset and strides in its elements, from its first), or None when
    it would reach outside ``base``: a client sees only what it sent or was sent."""
    if len(shape) != len(stride) or offset < 0 or any(s < 0 for s in stride) or any(n < 0 for n in shape):
        return None
    if any(n == 0 for n in shape):
        return base.reshape(-1)[:0].as_strided(shape, stride, base.storage_offset())
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if last >= base.numel() or not base.is_contiguous():
        return None
    return base.as_strided(shape, stride, base.storage_offset() + offset)


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
                          max_payload=worker.config.max_payload, pid=os.getpid(), torch=torch.__version__,
                          kernel_timeout=worker.config.kernel_timeout, releases=True)

        def exposed_prepare(self, op_json) -> str:
            return self._prepare(op_json, OpCall, worker.prepare, self._session.ops, "prepare", "an op call", "op",
                                 planned=self._session.plan)

        def exposed_prepare_unit(self, unit_json) -> str:
            return self._prepare(unit_json, UnitCall, worker.prepare_unit, self._session.units, "prepare_unit",
                                 "a unit", "unit")

        def _prepare(self, text, kind, prepare, kept: dict, method: str, what: str, short: str,
                     planned=None) -> str:
            """Parse (through the allow-list), admit and compile an op or a unit; keep it for this client
            (an op with a plan: its handle is in the reply)."""
            try:
                if not isinstance(text, str):
                    raise OpRefused(f"{method} takes {what} as a JSON string")
                call = kind.loads(text)
                support = prepare(call)
                handle = None
                if support:
                    kept[call.signature] = call
                    handle = planned(call) if planned is not None else None
                return _reply(ok=support.ok, reason=support.reason, signature=call.signature, handle=handle)
            except TapmlError as e:
                return _reply(ok=False, reason=f"refused: {e}")
            except Exception as e:
                return _reply(ok=False, reason=f"worker failed to prepare the {short}: {type(e).__name__}: {e}")

        def exposed_stats(self) -> str:
            return _reply(**{k: int(v) for k, v in worker.platform.stats.items()},
                          cached_bytes=self._session.cache.used)

    return WorkerService


def _authenticator(worker: _Worker):
    token = worker.config.token

    def authenticate(sock):
        try:
            line = read_preamble(sock, deadline_s=worker.config.preamble_s)
        except (OSError, WireError) as e:
            raise AuthenticationError(f"no preamble: {e}") from None
        finally:
            worker.ungate(sock)
        kind, _, given = line.partition(" ")
        if kind != "TAPML1" or not hmac.compare_digest(given.encode(), token.encode()):
            raise AuthenticationError("wrong token")
        if len(worker.sessions) >= worker.config.max_clients:
            raise AuthenticationError("too many clients")
        return sock, None

    return authenticate


class _Server(ThreadedServer):
    """rpyc's threaded server with an accept loop that survives a full file-descriptor table
    (rpyc's own ends the server, so the worker exited 0 with no message) and caps the
    connections still in their preamble."""

    def __init__(self, *args, worker: _Worker, **kw):
        super().__init__(*args, **kw)
        self._worker = worker

    def accept(self):
        sock = _accept(self.listener, lambda: self.active)
        if sock is None:
            if self.active:
                raise EOFError()
            return
        self._worker.gate(sock)
        sock.setblocking(True)
        self.clients.add(sock)
        self._accept_method(sock)


def serve(config: WorkerConfig) -> None:
    """Serve until killed. Raises ``PlatformError`` if the platform cannot start."""
    worker = _Worker(config)
    server = _Server(make_service(worker), hostname=config.host, port=config.port,
                     authenticator=_authenticator(worker), protocol_config=SERVER_CONFIG, logger=_quiet_logger(),
                     worker=worker)
    if config.watch_stdin:
        threading.Thread(target=_exit_on_stdin_eof, daemon=True).start()
    server._listen()  # listen before announcing: rpyc binds in __init__ but listens in start(); idempotent
    if config.announce:
        print(f"{READY} {config.host} {server.port}", flush=True)
    else:
        print(f"tapml worker: {worker.platform.name} on {config.host}:{server.port} (token required)",
              file=sys.stderr, flush=True)
    try:
        server.start()
    finally:
        worker.alive = False


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

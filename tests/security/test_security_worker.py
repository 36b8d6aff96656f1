"""Denial of service and hangs: no client can stop the worker, and no dead worker can stall the client."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import run_ops
from tapml.carving import FixtureStore, carve
from tapml.core import OpCall
from tapml.engine import migrate
from tapml.judging import Judge
from tapml.platforms import PlatformError
from tapml.remote import RemoteTarget, WorkerConfig, spawn_worker
from tapml.remote.wire import recv_frame, send_frame

HELPERS = Path(__file__).resolve().parent.parent / "helpers" / "failing_platforms.py"
SPEC = {"dtype": "float32", "shape": [3], "stride": [1]}
NEG = OpCall(op="aten.neg.default", args=[{"tensor": SPEC}], kwargs={"dict": {}}, outputs={"tensor": SPEC})


def serves(address: str, token: str) -> bool:
    with RemoteTarget(address, token=token, connect_timeout=10) as target:
        (out,) = target.execute(NEG, [torch.tensor([1.0, 2.0, 3.0])])
        return torch.equal(out, -torch.tensor([1.0, 2.0, 3.0]))


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes ``sock`` within ``seconds`` (a bounded wait, not a sleep)."""
    ready, _, _ = select.select([sock], [], [], seconds)
    return bool(ready) and sock.recv(1) == b""


def test_a_slow_preamble_is_cut_at_its_total_deadline():
    w = spawn_worker("torch-cpu", preamble_s=1.0)
    try:
        start = time.monotonic()
        drip = socket.create_connection((w.host, w.port))
        drip.sendall(b"TAP")  # then nothing: one byte at a time would have reset a per-byte timeout
        assert closed_within(drip, 10) and time.monotonic() - start < 5
        assert serves(w.address, w.token)
    finally:
        w.stop()


def test_many_unauthenticated_connections_do_not_stop_the_worker():
    w = spawn_worker("torch-cpu", max_pending=8, preamble_s=2.0)
    socks = []
    try:
        for _ in range(200):
            socks.append(socket.create_connection((w.host, w.port)))
        assert w.alive() and serves(w.address, w.token)
    finally:
        for s in socks:
            s.close()
        w.stop()


def test_running_out_of_file_descriptors_does_not_end_the_worker():
    config = WorkerConfig(platform="torch-cpu", token="fd-tok", announce=True, preamble_s=2.0, max_pending=1000)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
            "from tapml.remote.worker import main; sys.exit(main([sys.argv[1]]))")
    proc = subprocess.Popen([sys.executable, "-c", code, config.dumps()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TAPML_WORKER_TOKEN="fd-tok"))
    socks = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("TAPML-WORKER READY"), line + proc.stderr.read()
        port = int(line.split()[-1])
        for _ in range(120):  # more than the worker has descriptors for
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        assert proc.poll() is None
        for s in socks:
            s.close()
        socks.clear()
        deadline = time.monotonic() + 30
        while True:  # the held descriptors free up as the worker closes them on their deadline
            try:
                assert serves(f"127.0.0.1:{port}", "fd-tok")
                break
            except PlatformError:
                if time.monotonic() > deadline:
                    raise
        assert proc.poll() is None
    finally:
        for s in socks:
            s.close()
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("frame", [
    {"kind": "run"},
    {"kind": "run", "sig": "s", "index": "0", "module": "", "call": 0, "keys": []},
    {"kind": "run", "sig": "s", "index": 0, "module": "", "call": 0, "keys": [{"base": "k", "shape": [-1],
                                                                                "stride": [1], "offset": 0}]},
    {"kind": "run", "sig": "s", "index": 0, "module": "", "call": 0, "keys": [], "op": "aten.neg.default"},
    {"kind": "run", "sig": "s", "index": 0, "module": "", "call": 0, "keys": [],
     "op": {"op": "aten.neg.default", "args": [{"tensor": {"dtype": "_dynamo", "shape": [1], "stride": [1]}}],
            "kwargs": {"dict": {}}, "outputs": None}},
    {"kind": "launch"},
    # found by benchmarks/fuzz.py: each killed the session thread with a traceback before
    {"kind": "run", "sig": "s", "index": 0, "module": "", "call": 0, "keys": [],
     "op": {"op": "aten.neg.default", "args": [{"memory_format": ["a"]}], "kwargs": {"dict": {}}, "outputs": None}},
    {"kind": "run", "sig": "s", "index": 0, "module": "", "call": 0,
     "keys": [{"base": "k", "shape": [4], "stride": [1], "offset": 2**63}]},
    {"kind": "run", "sig": "s", "index": 0, "module": "", "call": 0,
     "keys": [{"base": "k", "shape": [4], "stride": [2**63], "offset": 0}]},
])
def test_malformed_frames_get_an_error_reply_and_no_traceback(frame):
    w = spawn_worker("torch-cpu")
    try:
        with RemoteTarget(w.address, token=w.token) as target:
            send_frame(target._data, frame)
            reply, _ = recv_frame(target._data)
            assert reply["kind"] == "reply" and reply["ok"] is False and reply["error"] in ("malformed", "unknown-op")
            send_frame(target._data, {"kind": "tensor", "key": "k", "dtype": "float32", "shape": [2], "nbytes": 7})
            target._data.sendall(b"x" * 7)  # a refused tensor is read and dropped: the channel stays in step
            assert serves(w.address, w.token)
        assert "Traceback" not in w.log.read_text()
    finally:
        w.stop()


def test_malformed_releases_are_ignored_and_the_channel_stays_in_step():
    """A release frame has no reply, so nothing in one may produce a reply or end the session."""
    w = spawn_worker("torch-cpu")
    try:
        with RemoteTarget(w.address, token=w.token) as target:
            for frame in ({"kind": "release"}, {"kind": "release", "names": "k"},
                          {"kind": "release", "names": [1, None, {"a": 1}, ["k"], "unknown"]},
                          {"kind": "release", "names": ["k"] * 5000}):
                send_frame(target._data, frame)
            send_frame(target._data, {"kind": "launch"})  # the next frame's reply is the next one read
            reply, _ = recv_frame(target._data)
            assert reply["kind"] == "reply" and reply["error"] == "malformed"
            assert serves(w.address, w.token)
        assert "Traceback" not in w.log.read_text()
    finally:
        w.stop()


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    path = tmp_path_factory.mktemp("s") / "store"
    carve(model, lambda: model(x), path)
    return model, x, FixtureStore(path)


def test_a_remote_worker_that_dies_for_good_costs_seconds_not_hours(small_store):
    model, x, store = small_store
    w = spawn_worker("torch-cpu")
    target = RemoteTarget(w.address, token=w.token, reconnect_s=1.0)
    try:
        assert serves(w.address, w.token)
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait()
        start = time.monotonic()
        results = run_ops(store, target)
        assert time.monotonic() - start < 15
        ran = [r for r in results if r.status != "skipped" or r.reason.startswith("not run")]
        first = next(r for r in ran if r.status == "crashed")
        assert "could not be reached again" in first.reason and "restarted" not in first.reason
        assert all(r.reason.startswith("not run:") for r in ran if r.index > first.index)
        run = migrate(lambda: model(x), store, target, judge=Judge())
        assert run.verdict == "incomplete" and "could not be reached again" in run.reason
    finally:
        target.close()
        w.stop()


def test_restarts_are_counted_in_the_run_record(small_store):
    model, x, store = small_store
    gelu = next(op["index"] for op in store.ops if op["op"] == "aten.gelu.default")
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(gelu))
    with RemoteTarget(spawn=f"{HELPERS}:KillSelf", spawn_options={"env": env}) as target:
        run = migrate(lambda: model(x), store, target, judge=Judge(), plan="all")
    assert run.verdict == "incomplete" and run.target_events
    assert {(e.what, e.recovery, e.op) for e in run.target_events} == {("crashed", "respawned", gelu)}
    assert "worker restarts" in run.summary


def _supervised(platform: str, *extra, env=None) -> tuple[subprocess.Popen, str]:
    token = "sup-tok"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tapml-test-token-{os.getpid()}"
    path.write_text(token)
    proc = subprocess.Popen([sys.executable, "-m", "tapml.cli", "worker", "--platform", platform, "--supervise",
                             "--token-file", str(path), *extra], stderr=subprocess.PIPE, text=True,
                            env=env or dict(os.environ))
    line = proc.stderr.readline()
    assert "supervising" in line, line
    return proc, line.strip().rsplit(" ", 1)[-1]


def test_a_stopped_execution_process_is_noticed_between_kernels():
    proc, address = _supervised("torch-cpu")
    try:
        with RemoteTarget(address, token="sup-tok") as target:
            pid = target.info["pid"]
        os.kill(pid, signal.SIGSTOP)  # frozen between kernels: no kernel is running to time out
        deadline = time.monotonic() + 30
        while True:
            try:
                with RemoteTarget(address, token="sup-tok", connect_timeout=2) as target:
                    if target.info["pid"] != pid:
                        break
            except PlatformError:
                pass
            assert time.monotonic() < deadline, "the supervisor never replaced the stopped process"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_kernel_past_the_kernel_timeout_is_a_timeout(small_store):
    _, _, store = small_store
    victim = next(op["index"] for op in store.ops if op["op"] == "aten.gelu.default")
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(victim))
    proc, address = _supervised(f"{HELPERS}:Hang", "--kernel-timeout", "3", env=env)
    try:
        with RemoteTarget(address, token="sup-tok", timeout=120, reconnect_s=60) as target:
            results = {r.index: r for r in run_ops(store, target)}
        assert results[victim].status == "timeout" and "--kernel-timeout" in results[victim].reason
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_worker_killed_during_start_up_is_reported_and_respawned(tmp_path):
    once = tmp_path / "killed-once"
    plugin = tmp_path / "suicidal.py"
    plugin.write_text(
        "import os, signal, sys\n"
        "from tapml.platforms import TorchPlatform\n"
        "flag = os.environ['TAPML_TEST_FLAG']\n"
        "if os.environ.get('TAPML_TEST_ALWAYS') or not os.path.exists(flag):\n"
        "    open(flag, 'w').close()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "class P(TorchPlatform):\n    name = 'suicidal'\n")
    env = dict(os.environ, TAPML_TEST_FLAG=str(once))
    w = spawn_worker(f"{plugin}:P", env=env)
    try:
        assert once.exists() and serves(w.address, w.token)  # the second attempt started
    finally:
        w.stop()
    start = time.monotonic()
    with pytest.raises(PlatformError, match="killed by signal 9 during start-up"):
        spawn_worker(f"{plugin}:P", env=dict(env, TAPML_TEST_ALWAYS="1"))
    assert time.monotonic() - start < 60


def test_spawned_workers_leave_no_logs_behind():
    target = RemoteTarget(spawn="torch-cpu")
    log = target._worker.log
    assert log.exists()
    target.close()
    assert not log.exists()


def test_a_worker_without_a_token_file_generates_one_and_says_where(tmp_path):
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "tapml.cli", "worker", "--platform", "torch-cpu"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stderr.readline()
        assert "--token-file" in first, first
        token_file = Path(first.rsplit("--token-file ", 1)[1].rstrip(")\n"))
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        address = proc.stderr.readline().split(" on ")[1].split()[0]
        with pytest.raises(PlatformError, match="cannot reach"):
            RemoteTarget(address, token="", connect_timeout=5)
        assert serves(address, token_file.read_text().strip())
    finally:
        proc.kill()
        proc.wait()
    assert json.loads('"ok"') == "ok"


def test_a_frame_that_stalls_halfway_is_cut():
    w = spawn_worker("torch-cpu", frame_s=1.0)
    try:
        with RemoteTarget(w.address, token=w.token) as target:
            target._data.sendall((100).to_bytes(4, "little") + b"{}")  # 98 header bytes never come
            assert closed_within(target._data, 10)
        assert serves(w.address, w.token)
    finally:
        w.stop()

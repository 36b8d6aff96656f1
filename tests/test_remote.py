"""Real worker processes on loopback: exactness, caching, failures, security."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import rpyc
import torch

from helpers import run_ops
from tapml.platforms import PlatformError
from tapml.remote import PayloadTooLarge, RemoteTarget, spawn_worker
from tapml.remote.wire import recv_frame, send_frame, send_tensor

HELPERS = Path(__file__).resolve().parent / "helpers" / "failing_platforms.py"


def compute_ops(store, n=None):
    idx = [i for i, op in enumerate(store.ops) if not op["view"] and op["op"] != "aten._local_scalar_dense.default"]
    return idx[:n] if n else idx


def test_torch_cpu_through_a_spawned_worker_is_exact_and_sends_weights_once(minilm_store):
    with RemoteTarget(spawn="torch-cpu") as target:
        pid = target.info["pid"]
        results = run_ops(minilm_store, target)
        ran = [r for r in results if r.local is not None]
        assert len(ran) >= 150 and all(r.local.max_abs == 0.0 for r in ran)
        first = target.stats["bytes_sent"]
        run_ops(minilm_store, target)  # the same inputs again: all referenced by hash
        assert target.stats["bytes_sent"] == first
        assert target.stats["bytes_reused"] >= first
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # torn down on close


def test_worker_killed_mid_batch_costs_one_op(minilm_store):
    ops = compute_ops(minilm_store, 40)
    victim = ops[20]
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(victim))
    with RemoteTarget(spawn=f"{HELPERS}:KillSelf", spawn_options={"env": env}) as target:
        results = run_ops(minilm_store, target, indices=ops)
        status = {r.index: r for r in results}
        assert status[victim].status == "crashed" and "died" in status[victim].reason
        rest = [r for r in results if r.index != victim]
        assert all(r.local is not None and r.local.max_abs == 0.0 for r in rest)
        assert target.restarts == 1


def test_hung_kernel_times_out_and_the_run_goes_on(minilm_store):
    ops = compute_ops(minilm_store, 12)
    victim = ops[5]
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(victim))
    with RemoteTarget(spawn=f"{HELPERS}:Hang", spawn_options={"env": env}, timeout=3) as target:
        results = {r.index: r for r in run_ops(minilm_store, target, indices=ops)}
        assert results[victim].status == "timeout"
        assert all(r.local is not None for i, r in results.items() if i != victim)


@pytest.fixture
def token_worker():
    worker = spawn_worker("torch-cpu", token="s3cret-token")
    yield worker
    worker.stop()


def test_wrong_or_missing_token_is_refused(token_worker):
    for token in ("wrong", None):
        with pytest.raises(PlatformError, match="cannot reach the worker"):
            RemoteTarget(token_worker.address, token=token, connect_timeout=5)
    with RemoteTarget(token_worker.address, token="s3cret-token") as ok:
        assert ok.name == "torch-cpu"


def test_only_named_methods_are_exposed(token_worker):
    sock = socket.create_connection((token_worker.host, token_worker.port))
    sock.sendall(b"TAPML1 s3cret-token\n")
    conn = rpyc.utils.factory.connect_stream(rpyc.SocketStream(sock))
    try:
        assert json.loads(conn.root.hello())["platform"] == "torch-cpu"
        for attr in ("_session", "on_connect", "exposed_hello.__globals__", "exposed_prepare.__func__"):
            with pytest.raises(AttributeError):
                obj = conn.root
                for part in attr.split("."):
                    obj = getattr(obj, part)
        with pytest.raises(AttributeError):  # classic mode is not served at all: no `modules`
            conn.modules.os.system("true")
        reply = json.loads(conn.root.prepare("not json"))  # bad input is a JSON error, not a raise
        assert reply["ok"] is False and "not JSON" in reply["reason"]
    finally:
        conn.close()


def test_oversized_payloads_are_refused_and_the_worker_stays_up(minilm_store):
    with RemoteTarget(spawn="torch-cpu", spawn_options={"max_payload": 4096}) as target:
        big = torch.zeros(4096)
        op = next(minilm_store.op_call(i) for i in compute_ops(minilm_store)
                  if all(s.nbytes <= 4096 for s in minilm_store.op_call(i).output_specs))
        with pytest.raises(PayloadTooLarge, match="exceeds the worker's payload cap of 4096"):
            target.execute(op, [big] * len(op.inputs))
        # a client that skips the local check: the worker reads, discards and refuses it
        send_tensor(target._data, "huge", big)
        send_frame(target._data, {"kind": "run", "sig": op.signature, "index": op.index, "module": op.module,
                                  "call": op.call, "keys": ["huge"] * len(op.inputs), "op": op.to_json()})
        reply, _ = recv_frame(target._data)
        assert reply["error"] == "refused" and "payload cap" in reply["message"]
        small = [i for i in compute_ops(minilm_store)
                 if all(s.nbytes <= 4096 for s in minilm_store.op_call(i).inputs + minilm_store.op_call(i).output_specs)
                 ][:3]
        results = run_ops(minilm_store, target, indices=small)
        assert small and all(r.local is not None and r.local.max_abs == 0.0 for r in results)


def test_several_clients_at_once(minilm_store):
    worker = spawn_worker("torch-cpu")
    errors, ops = [], compute_ops(minilm_store, 60)

    def client(k):
        try:
            with RemoteTarget(worker.address, token=worker.token) as target:
                results = run_ops(minilm_store, target, indices=ops[k::3])
                assert all(r.local is not None and r.local.max_abs == 0.0 for r in results)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
    finally:
        worker.stop()


def test_supervised_remote_worker_restarts_after_a_crash(minilm_store, tmp_path):
    ops = compute_ops(minilm_store, 10)
    victim = ops[4]
    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(victim))
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tapml.cli import main; sys.exit(main())", "worker",
         "--platform", f"{HELPERS}:KillSelf", "--supervise", "--token-file", str(token_file), "--port", "0"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert "supervising" in line, line
        address = line.strip().rsplit(" ", 1)[-1]
        with RemoteTarget(address, token="tok-123", reconnect_s=60) as target:
            first_pid = target.info["pid"]
            results = {r.index: r for r in run_ops(minilm_store, target, indices=ops)}
            assert results[victim].status == "crashed"
            assert all(r.local is not None for i, r in results.items() if i != victim)
            assert target.info["pid"] != first_pid  # a fresh execution process
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_unavailable_platform_fails_fast_with_its_reason():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(PlatformError, match="not available here: no CUDA device"):
        spawn_worker("torch-cuda", startup_timeout=60)


def test_worker_cli_serves_replay_over_remote(minilm_store, tmp_path, capsys):
    from tapml.cli import main

    token_file = tmp_path / "token"
    token_file.write_text("abc123\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tapml.cli import main; sys.exit(main())", "worker",
         "--platform", "torch-cpu", "--token-file", str(token_file)], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "torch-cpu on 127.0.0.1:" in line and "token required" in line, line
        address = line.split(" on ")[1].split()[0]
        code = main(["replay", str(minilm_store.path), "--remote", address, "--token-file", str(token_file),
                     "--json"])
        summary = json.loads(capsys.readouterr().out)
        assert code == 0 and summary["platform"] == "torch-cpu" and summary["max_abs_error"] == 0.0
        code = main(["replay", str(minilm_store.path), "--remote", address])  # no token
        assert code == 2 and "cannot reach the worker" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def test_worker_refuses_a_public_bind_without_a_token(capsys):
    from tapml.cli import main

    assert main(["worker", "--platform", "torch-cpu", "--host", "0.0.0.0"]) == 2
    assert "give --token-file" in capsys.readouterr().err
    assert main(["worker", "--platform", "torch-cuda" if not torch.cuda.is_available() else "nope"]) == 2

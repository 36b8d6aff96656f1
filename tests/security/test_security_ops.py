"""An op name is data: the attacks of issue 11 on the wire and through a store must not run anything."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import rpyc
import torch

from tapml.carving import OP_COLUMNS, FixtureStore, StoreError, carve
from tapml.core import OpCall, OpRefused, resolve_op
from tapml.remote import RemoteTarget, spawn_worker
from tapml.remote.wire import recv_frame, send_frame, send_tensor

DANGEROUS = ["aten.from_file.default", "load_library.__call__.__call__", "aten._print.default",
             "aten.record_stream.default", "aten.set_.source_Storage", "torch.load.default", "os.system.default",
             "aten.__class__.__init__", "aten.from_file", "aten..default", "aten.add.Tensor; rm -rf /"]


@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_names_never_resolve(name):
    with pytest.raises(OpRefused):
        resolve_op(name)


def test_safe_names_resolve_and_inplace_comes_from_the_schema():
    assert str(resolve_op("aten.addmm.default")) == "aten.addmm.default"
    assert str(resolve_op("prims.add.default")) == "prims.add.default"
    spec = {"dtype": "float32", "shape": [2], "stride": [1]}
    op = OpCall.from_json({"op": "aten.copy_.default", "args": [{"tensor": spec}, {"tensor": spec}],
                           "kwargs": {"dict": {}}, "outputs": {"tensor": spec}, "inplace": False, "view": True})
    assert op.inplace and not op.view  # the sender's claims are ignored


@pytest.fixture(scope="module")
def worker():
    w = spawn_worker("torch-cpu", token="t0k")
    yield w
    w.stop()


def _rpyc(worker):
    sock = socket.create_connection((worker.host, worker.port))
    sock.sendall(f"TAPML1 {worker.token}\n".encode())
    return rpyc.utils.factory.connect_stream(rpyc.SocketStream(sock))


def _call(name: str, canary: Path) -> dict:
    return {"op": name, "args": [str(canary), True, 64], "kwargs": {"dict": {"dtype": {"dtype": "uint8"}}},
            "outputs": {"tensor": {"dtype": "uint8", "shape": [64], "stride": [1]}}}


@pytest.mark.parametrize("name", DANGEROUS[:4])
def test_the_worker_refuses_them_on_both_channels_and_stays_up(worker, name, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("SECRET-CANARY" * 8)
    conn = _rpyc(worker)
    try:
        reply = json.loads(conn.root.prepare(json.dumps(_call(name, canary))))
        assert reply["ok"] is False and "refused" in reply["reason"]
        info = json.loads(conn.root.hello())
        data = socket.create_connection((worker.host, info["data_port"]))
        data.sendall(f"TAPMLDATA {info['nonce']}\n".encode())
        send_frame(data, {"kind": "run", "sig": "x" * 16, "index": 0, "module": "", "call": 0, "keys": [],
                          "op": _call(name, canary)})
        frame, _ = recv_frame(data)
        assert frame["kind"] == "reply" and not frame["ok"] and frame["error"] == "malformed"
        assert "SECRET-CANARY" not in json.dumps(frame)
        data.close()
    finally:
        conn.close()
    with RemoteTarget(worker.address, token=worker.token) as target:  # still serving, correctly
        spec = {"dtype": "float32", "shape": [3], "stride": [1]}
        op = OpCall(op="aten.neg.default", args=[{"tensor": spec}], kwargs={"dict": {}}, outputs={"tensor": spec})
        (out,) = target.execute(op, [torch.tensor([1.0, -2.0, 3.0])])
        assert torch.equal(out, torch.tensor([-1.0, 2.0, -3.0]))


def test_rng_uninitialized_and_huge_creation_ops_are_refused_by_the_worker(worker):
    rand = {"op": "aten.rand.default", "args": [[4]], "kwargs": {"dict": {}},
            "outputs": {"tensor": {"dtype": "float32", "shape": [4], "stride": [1]}}}
    empty = dict(rand, op="aten.empty.memory_format")
    full = {"op": "aten.full.default", "args": [[1 << 20, 1 << 20], 1.0], "kwargs": {"dict": {}},
            "outputs": {"tensor": {"dtype": "float32", "shape": [1 << 20, 1 << 20], "stride": [1 << 20, 1]}}}
    conn = _rpyc(worker)
    try:
        for call, why in ((rand, "RNG state"), (empty, "uninitialized memory"), (full, "payload cap")):
            reply = json.loads(conn.root.prepare(json.dumps(call)))
            assert reply["ok"] is False and why in reply["reason"], reply
    finally:
        conn.close()


def _reseal(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    text = json.dumps(body, separators=(",", ":"))
    return f'{text[:-1]},"digest":"{hashlib.sha256(text.encode()).hexdigest()}"}}'


@pytest.fixture
def tampered(tmp_path):
    model = torch.nn.Linear(4, 4).eval()
    x = torch.randn(2, 4)
    carve(model, lambda: model(x), tmp_path / "s")
    canary = tmp_path / "canary"
    canary.write_text("SECRET-CANARY" * 8)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["strings"].append("aten.from_file.default")  # schema 2: an op is a row, its name an index into strings
    manifest["ops"][-1][OP_COLUMNS.index("op")] = len(manifest["strings"]) - 1
    manifest["ops"][-1][OP_COLUMNS.index("args")] = [str(canary), True, 64]
    (tmp_path / "s" / "manifest.json").write_text(_reseal(manifest))
    return tmp_path / "s", canary


def test_a_resealed_tampered_store_is_refused_before_anything_runs(tampered, tmp_path):
    store, canary = tampered
    with pytest.raises(StoreError, match="from_file.*side effects"):
        FixtureStore(store)
    before = canary.stat().st_atime_ns
    for args in (["inspect", str(store)], ["replay", str(store), "--platform", "torch-cpu", "--json"]):
        proc = subprocess.run([sys.executable, "-m", "tapml.cli", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "refused" in proc.stderr and "Traceback" not in proc.stderr
        assert "SECRET-CANARY" not in proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tapml-store", str(store)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "SECRET-CANARY" not in proc.stdout + proc.stderr
    assert "refused" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert canary.stat().st_atime_ns == before  # never opened


def test_send_tensor_keys_are_per_session(worker):
    """A client can only poison its own session's tensor cache: another client never sees its keys."""
    with RemoteTarget(worker.address, token=worker.token) as a, RemoteTarget(worker.address, token=worker.token) as b:
        send_tensor(a._data, "shared-key", torch.ones(3))
        spec = {"dtype": "float32", "shape": [3], "stride": [1]}
        op = OpCall(op="aten.neg.default", args=[{"tensor": spec}], kwargs={"dict": {}}, outputs={"tensor": spec})
        b.prepare(op)
        send_frame(b._data, {"kind": "run", "sig": op.signature, "index": 0, "module": "", "call": 0,
                             "keys": ["shared-key"]})
        reply, _ = recv_frame(b._data)
        assert reply["error"] == "missing"

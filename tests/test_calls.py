"""The binary op-run path (``remote/calls.py``): one call frame to a real worker, one outputs frame back."""

from __future__ import annotations

import socket
import struct

import pytest
import torch

import tapml.remote.client as client_module
from tapml.core import OpCall, content_digest, content_key
from tapml.remote import RemoteTarget, spawn_worker
from tapml.remote.calls import (
    CALL,
    DTYPES,
    OUTPUTS,
    call_head,
    input_entry,
    output_buffers,
    read_outputs,
    view_entry,
)
from tapml.remote.wire import FrameReader, WireError, recv_frame, send_buffers


def _op(name: str, specs: list[dict], outputs, kwargs: dict | None = None) -> OpCall:
    return OpCall(op=name, args=[{"tensor": s} for s in specs], kwargs={"dict": kwargs or {}}, outputs=outputs)


def _spec(shape, dtype="float32") -> dict:
    stride, step = [], 1
    for s in reversed(shape):
        stride.insert(0, step)
        step *= s
    return {"dtype": dtype, "shape": list(shape), "stride": stride}


ADD = _op("aten.add.Tensor", [_spec([2, 3]), _spec([2, 3])], {"tensor": _spec([2, 3])})
CLONE = _op("aten.clone.default", [_spec([4])], {"tensor": _spec([4])})


@pytest.fixture(scope="module")
def worker():
    w = spawn_worker("torch-cpu", max_payload=1 << 16)
    yield w
    w.stop()


@pytest.fixture
def binary_answers(monkeypatch) -> list[int]:
    """How many answers came back as binary outputs frames (the client's parser, counted)."""
    seen: list[int] = []

    def counted(reader, magic, max_payload, into=None):
        frame = read_outputs(reader, magic, max_payload, into)
        seen.append(len(frame["outputs"]))
        return frame

    monkeypatch.setattr(client_module, "read_outputs", counted)
    return seen


def test_runs_after_prepare_are_one_binary_frame_each_way_and_exact(worker, binary_answers):
    with RemoteTarget(worker.address, token=worker.token) as target:
        assert target.prepare(ADD) and ADD.signature in target._handles
        for _ in range(5):
            a, b = torch.randn(2, 3), torch.randn(2, 3)
            (out,) = target.execute(ADD, [a, b])
            assert torch.equal(out, a + b)
        assert binary_answers == [1] * 5
        assert target.stats["runs"] == 5 and target.stats["bytes_sent"] == 5 * 2 * 24


def test_outputs_stay_on_the_worker_under_their_content_key(worker, binary_answers):
    with RemoteTarget(worker.address, token=worker.token) as target:
        x = torch.randn(2, 3)
        (y,) = target.execute(ADD, [x, x])  # the same tensor twice: sent once
        assert target.stats["bytes_sent"] == 24
        assert content_key(y.reshape(-1)) in target._known
        (z,) = target.execute(ADD, [y, x])  # y is the worker's own output: referenced by key, not resent
        assert torch.equal(z, y + x) and target.stats["bytes_sent"] == 24
        assert target.stats["bytes_reused"] == 24 + 48
        # the worker answers a hand-made call that names y by its key alone
        handle = target._handles[ADD.signature]
        key = content_digest(y.reshape(-1))
        send_buffers(target._data, [call_head(handle, 0, 0, b"", 2), input_entry(True, key, 0),
                                    input_entry(True, key, 0)])
        frame, _ = target._reader.read(binary=read_outputs)
        ((out_key, doubled),) = frame["outputs"]
        assert torch.equal(doubled, y + y) and out_key == content_key(doubled.reshape(-1))
        assert binary_answers == [1, 1]  # (the hand-made call was read here, not by the client)


def test_outputs_of_every_kind_cross_in_one_frame(worker, binary_answers):
    """Two outputs of two dtypes, a 0-dim bfloat16 (no numpy dtype), an empty bool tensor."""
    max_dim = OpCall(op="aten.max.dim", args=[{"tensor": _spec([3, 5])}, 1], kwargs={"dict": {}},
                     outputs={"tuple": [{"tensor": _spec([3])}, {"tensor": _spec([3], "int64")}]})
    bf16_sum = _op("aten.sum.default", [_spec([4], "bfloat16")], {"tensor": _spec([], "bfloat16")})
    gt = OpCall(op="aten.gt.Scalar", args=[{"tensor": _spec([0, 2])}, 0.0], kwargs={"dict": {}},
                outputs={"tensor": _spec([0, 2], "bool")})
    cases = [(max_dim, torch.randn(3, 5), lambda x: list(x.max(dim=1))),
             (bf16_sum, torch.randn(4).bfloat16(), lambda x: [x.sum()]),
             (gt, torch.randn(0, 2), lambda x: [x > 0])]
    with RemoteTarget(worker.address, token=worker.token) as target:
        for op, x, reference in cases:
            for _ in range(2):
                outputs = target.execute(op, [x])
            expected = reference(x)
            assert len(outputs) == len(expected)
            for got, want in zip(outputs, expected, strict=True):
                assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert binary_answers == [2, 2, 1, 1, 1, 1]


def test_a_view_input_takes_the_json_frames_and_stays_exact(worker, binary_answers):
    with RemoteTarget(worker.address, token=worker.token) as target:
        base = torch.randn(3, 2)
        (out,) = target.execute(ADD, [base.t(), torch.ones(2, 3)])
        assert torch.equal(out, base.t() + 1) and binary_answers == []


def test_an_evicted_input_or_a_forgotten_plan_is_resent_once(worker, binary_answers):
    with RemoteTarget(worker.address, token=worker.token) as target:
        x = torch.randn(4)
        target._known.add(content_key(x))  # the client believes the worker holds x: it answers "missing"
        (out,) = target.execute(CLONE, [x])
        assert torch.equal(out, x) and target.stats["bytes_sent"] == 16
        target._handles[CLONE.signature] = 12345  # a plan the worker never made: "unknown-handle"
        y = torch.randn(4)
        (out,) = target.execute(CLONE, [y])
        assert torch.equal(out, y) and target._handles[CLONE.signature] != 12345
        (out,) = target.execute(CLONE, [y + 1])
        assert torch.equal(out, y + 1)
        assert binary_answers == [1]  # each retry went by JSON frames (which gave the plan back), the last run binary


def _reply(sock: socket.socket) -> dict:
    reply, _ = recv_frame(sock)
    assert reply["kind"] == "reply" and reply["ok"] is False
    return reply


def test_malformed_call_frames_get_a_one_line_refusal_and_the_worker_survives(worker):
    x = torch.randn(4)
    payload, key = x.numpy().tobytes(), content_digest(x)
    with RemoteTarget(worker.address, token=worker.token) as target:
        assert target.prepare(CLONE)
        h, sock = target._handles[CLONE.signature], target._data
        cases = [
            ([call_head(h + 1000, 0, 0, b"", 1), input_entry(False, key, 16), payload], "unknown-handle"),
            ([call_head(h, 0, 0, b"", 2), input_entry(False, key, 16), payload, input_entry(True, key, 0)],
             "malformed"),
            ([call_head(h, 0, 0, b"", 1), input_entry(False, key, 12), payload[:12]], "malformed"),
            ([call_head(h, 0, 0, b"", 1), input_entry(False, key, 1 << 17), bytes(1 << 17)], "refused"),
            ([call_head(h, 0, 0, b"", 1), struct.pack("<B16sQ", 0, key, 5)], "malformed"),  # held, with a size
            ([call_head(h, 0, 0, b"\xff\xfe", 1), input_entry(False, key, 16), payload], "malformed"),
            ([call_head(h, -7, 0, b"", 1), input_entry(False, key, 16), payload], "malformed"),
            ([call_head(h, 0, 0, b"", 1), input_entry(True, b"\0" * 16, 0)], "missing"),
        ]
        for buffers, error in cases:
            send_buffers(sock, buffers)
            reply = _reply(sock)
            assert reply["error"] == error, (error, reply)
            assert len(reply.get("message", "")) < 300
        (out,) = target.execute(CLONE, [x])  # the channel is still in step
        assert torch.equal(out, x)
        send_buffers(sock, [call_head(h, 0, 0, b"", 1), b"\x07" + key + bytes(8)])  # an unknown input kind
        sock.settimeout(10)
        assert sock.recv(1) == b""  # loses the framing: the session closes, the worker goes on
    with RemoteTarget(worker.address, token=worker.token) as target:
        (out,) = target.execute(CLONE, [x])
        assert torch.equal(out, x)
    assert "Traceback" not in worker.log.read_text()


def test_the_frames_check_every_field_they_read():
    a, b = socket.socketpair()
    try:
        t = torch.arange(6, dtype=torch.int32).reshape(2, 3)
        send_buffers(a, output_buffers([(content_digest(t.reshape(-1)), t, memoryview(t.numpy()).cast("B"))], 1e-6))
        frame, _ = FrameReader(b).read(binary=read_outputs)
        assert frame["kernel_s"] == 1e-6 and torch.equal(frame["outputs"][0][1], t)
        for head in (bytes([len(DTYPES), 1]), bytes([0, 65])):  # an unknown dtype code, a rank over the cap
            send_buffers(a, [OUTPUTS.to_bytes(4, "little") + bytes(8) + (1).to_bytes(2, "little") + head + bytes(24)])
            with pytest.raises(WireError):
                FrameReader(b).read(binary=read_outputs)
        send_buffers(a, [CALL.to_bytes(4, "little")])
        with pytest.raises(WireError):  # a binary frame where none is expected
            FrameReader(b).read()
    finally:
        a.close(), b.close()


def test_runs_in_flight_take_earlier_outputs_by_name(worker, binary_answers):
    """Pipelined runs: a call sent before the last one's answer takes its output by the name the client
    gave it (whole, or a view of it by JSON frames); answers come back in order."""
    with RemoteTarget(worker.address, token=worker.token) as target:
        assert target.prepare(ADD) and target.prepare(CLONE)
        a, b = torch.randn(2, 3), torch.randn(2, 3)
        target.execute(ADD, [a, b])  # the worker plans ADD; CLONE's first run makes its plan
        target.execute(CLONE, [torch.randn(4)])
        pending = torch.full((2, 3), float("nan"))  # what the client holds while ADD's answer is on its way
        nothing = lambda t: None  # noqa: E731
        (name,) = target.send_run(ADD, [a, b], nothing)
        target.send_run(ADD, [pending, a], lambda t: name if t is pending else None)
        window = pending.reshape(-1)[2:6]
        target.send_run(CLONE, [window], lambda t: name if t is window else None)
        target.send_run(CLONE, [torch.zeros(4)], lambda t: "ab" * 16)  # a name never given: run it again
        assert target.in_flight == 4
        answers = [target.receive_run() for _ in range(4)]
        ((s,), e1, _), ((doubled,), e2, _), ((cut,), e3, _), last = answers
        assert e1 is None and e2 is None and e3 is None and last == (None, None, 0.0)
        assert torch.equal(s, a + b) and torch.equal(doubled, s + a) and torch.equal(cut, s.reshape(-1)[2:6])
        assert target.in_flight == 0 and binary_answers == [1] * 5  # the view too: a view of a held tensor
        (out,) = target.execute(CLONE, [torch.zeros(4)])  # one at a time again, once nothing is in flight
        assert torch.equal(out, torch.zeros(4))


def test_too_many_output_names_are_refused_in_step(worker):
    with RemoteTarget(worker.address, token=worker.token) as target:
        x = torch.randn(4)
        target.execute(CLONE, [x])
        handle = target._handles[CLONE.signature]
        names = struct.pack("<H", 5000) + bytes(16 * 5000)
        head = call_head(handle, 0, 0, b"", 1, named=True)
        send_buffers(target._data, [head, input_entry(True, content_digest(x), 0), names])
        assert "output names" in _reply(target._data)["message"]
        (out,) = target.execute(CLONE, [x])  # the channel is still in step
        assert torch.equal(out, x)


def test_a_view_of_a_held_tensor_travels_as_its_key_and_geometry(worker, binary_answers):
    with RemoteTarget(worker.address, token=worker.token) as target:
        base = torch.randn(3, 2)
        target.execute(ADD, [base.t(), torch.ones(2, 3)])  # by JSON frames: the worker now holds base
        (out,) = target.execute(ADD, [base.t(), torch.zeros(2, 3)])
        assert torch.equal(out, base.t()) and binary_answers == [1]  # one binary frame: nothing resent
        sent = target.stats["bytes_sent"]
        (out,) = target.execute(CLONE, [base.reshape(-1)[1:5]])
        assert torch.equal(out, base.reshape(-1)[1:5]) and target.stats["bytes_sent"] == sent + 0


def test_a_view_reaching_outside_its_held_tensor_is_refused_in_step(worker):
    with RemoteTarget(worker.address, token=worker.token) as target:
        x = torch.randn(4)
        target.execute(CLONE, [x])
        handle = target._handles[CLONE.signature]
        for offset, stride in ((1, (1,)), (0, (2,)), (2**62, (1,)), (0, (-1,))):
            send_buffers(target._data, [call_head(handle, 0, 0, b"", 1), view_entry(content_digest(x), offset, stride)])
            assert "in its bounds" in _reply(target._data)["message"]
        (out,) = target.execute(CLONE, [x])
        assert torch.equal(out, x)

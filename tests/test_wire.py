"""The data channel's framing: several frames in one write, payloads received into tensor memory, and an
unbuffered read that never consumes the next frame."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import torch

from tapml.remote.client import RELEASE_EVERY, RemoteTarget
from tapml.remote.wire import MAX_RELEASE, FrameReader, frame_buffers, recv_frame, send_buffers, tensor_buffers


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def test_a_burst_of_frames_and_a_large_payload_arrive_intact():
    a, b = _pair()
    big = torch.randn(1 << 18)  # 1 MiB: larger than the reader's buffer, written while the reader reads
    small = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    buffers = tensor_buffers("small", small)[0] + tensor_buffers("big", big)[0] + frame_buffers({"kind": "run"})
    writer = threading.Thread(target=send_buffers, args=(a, buffers))
    writer.start()
    reader = FrameReader(b, size=4096)
    got = [reader.read() for _ in range(3)]
    writer.join()
    assert [h.get("key", h["kind"]) for h, _ in got] == ["small", "big", "run"]
    assert torch.equal(got[0][1], small) and torch.equal(got[1][1], big) and got[2][1] is None
    a.close(), b.close()


def test_an_unbuffered_read_leaves_the_next_frame_on_the_socket():
    a, b = _pair()
    send_buffers(a, frame_buffers({"kind": "reply", "n": 1}) + frame_buffers({"kind": "reply", "n": 2}))
    first, _ = recv_frame(b)
    second, _ = FrameReader(b).read()
    assert (first["n"], second["n"]) == (1, 2)
    a.close(), b.close()


def test_a_refused_tensor_is_read_past_and_the_channel_stays_in_step():
    a, b = _pair()
    send_buffers(a, tensor_buffers("x", torch.ones(1024))[0] + frame_buffers({"kind": "run"}))
    reader = FrameReader(b)
    header, t = reader.read(max_payload=16)
    assert t is None and "payload cap" in header["refused"]
    assert reader.read()[0]["kind"] == "run"
    a.close(), b.close()


def test_released_names_travel_in_frames_the_worker_accepts():
    """More names than one release frame may carry (a drain of many multi-output runs) go in several: a
    frame over the worker's limit would be ignored whole, and those outputs held until evicted."""
    names = [f"{i:032x}" for i in range(2 * MAX_RELEASE + 5)]
    assert RemoteTarget._release(SimpleNamespace(_released=names[:RELEASE_EVERY - 1])) == []
    a, b = _pair()
    frames = RemoteTarget._release(SimpleNamespace(_released=names))
    writer = threading.Thread(target=send_buffers, args=(a, frames))
    writer.start()
    reader = FrameReader(b)
    got = [reader.read()[0] for _ in range(3)]
    writer.join()
    assert all(h["kind"] == "release" and len(h["names"]) <= MAX_RELEASE for h in got)
    assert [n for h in got for n in h["names"]] == names
    a.close(), b.close()

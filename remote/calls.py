"""The op-run path in binary: one ``call`` frame to the worker, one ``outputs`` frame back.

Why: a run of an op the worker has already admitted needs no JSON, no field-by-field
schema check and no op description: a small op's round trip is then mostly the two
wake-ups and the kernel, not Python work on each side. When an op is prepared the worker
keeps a *plan* for it (the admitted op and its input layout) under an integer
handle; a call frame names the handle, the op's place in the model, and each
input either by the content key of a tensor the worker holds or inline (key and
payload). The answer carries every output's dtype, shape, content key and bytes.

Layout (little-endian; ``magic`` is the length word of ``wire``, above its header cap)::

    call     u32 CALL | u32 handle | i64 index | i64 call | u16 module bytes | u16 inputs | module (UTF-8)
             then per input: u8 kind (0 held, 1 inline) | 16 bytes key | u64 payload bytes | payload
             or a strided view of a held tensor (a transposed weight, a slice of an output):
                            u8 2 | 16 bytes key | u64 storage offset | u8 rank | i64 × rank strides
                            (the shape is the plan's)
             (u32 CALL_NAMED: the same, then u16 names | 16 bytes × names: the worker also holds output k
             under name k, so a call sent before this one's answer can take it as a held input)
    outputs  u32 OUTPUTS | f64 kernel seconds | u16 outputs
             then per output: u8 dtype | u8 ndim | u64 payload bytes | 16 bytes key | i64 × ndim shape | payload

Every field is bounds-checked where it is read. A field that breaks the framing (an
unknown input kind) is a ``WireError``; anything else (an unknown handle, an input
count or byte count that does not fit the plan, an inline payload over the cap, a
module name that is not UTF-8) is read past and reported in the header (``error``,
``message``), so the channel stays in step and the peer gets a one-line refusal.
"""

from __future__ import annotations

import struct

import torch

from tapml.core import byte_view, dtype_name

from .wire import BINARY_MIN, FrameReader, WireError

__all__ = ["CALL", "CALL_NAMED", "OUTPUTS", "DTYPES", "MAX_INPUTS", "MAX_MODULE", "MAX_NDIM", "call_head",
           "input_entry", "view_entry", "names_entry", "read_call", "output_buffers", "read_outputs"]

CALL = BINARY_MIN + 0xCA11
CALL_NAMED = BINARY_MIN + 0xCA12
OUTPUTS = BINARY_MIN + 0x0A75
MAX_INPUTS = 4096
MAX_MODULE = 0xFFFF  # bytes of a module name (u16)
MAX_NDIM = 64
HELD, INLINE, VIEW = 0, 1, 2
_RANK = struct.Struct("<B")
_CALL_REST = struct.Struct("<IqqHH")  # a frame's fields after its magic
_CALL = struct.Struct("<I" + _CALL_REST.format[1:])
_INPUT = struct.Struct("<B16sQ")
_OUTPUTS_REST = struct.Struct("<dH")
_OUTPUTS = struct.Struct("<I" + _OUTPUTS_REST.format[1:])
_OUTPUT = struct.Struct("<BBQ16s")
_COUNT = struct.Struct("<H")
_DIMS = [struct.Struct(f"<{n}q") for n in range(MAX_NDIM + 1)]

# dtype codes on the wire: a fixed table (a code outside it is refused, never looked up in torch)
DTYPES: tuple[torch.dtype, ...] = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128, torch.complex64,
    torch.complex32, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
    torch.uint64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
_CODES = {d: i for i, d in enumerate(DTYPES)}


def call_head(handle: int, index: int, call: int, module: bytes, n_inputs: int, named: bool = False) -> bytes:
    """A call frame's head; ``named``: its input entries are followed by ``names_entry``."""
    return _CALL.pack(CALL_NAMED if named else CALL, handle, index, call, len(module), n_inputs) + module


def view_entry(key: bytes, offset: int, stride: tuple[int, ...]) -> bytes:
    """An input that is a strided view of the tensor the worker holds under ``key`` (its shape: the plan's)."""
    return _INPUT.pack(VIEW, key, offset) + _RANK.pack(len(stride)) + _DIMS[len(stride)].pack(*stride)


def names_entry(names: list[bytes]) -> bytes:
    """The names (16 bytes each) a ``CALL_NAMED`` frame gives its outputs, after its inputs."""
    return _COUNT.pack(len(names)) + b"".join(names)


def input_entry(held: bool, key: bytes, nbytes: int) -> bytes:
    """One input's entry; an inline input's payload follows it."""
    return _INPUT.pack(HELD if held else INLINE, key, 0 if held else nbytes)


def read_call(reader: FrameReader, magic: int, max_payload: int | None, plans: list) -> dict:
    """A call frame (after its magic): ``{"kind": "call", "plan", "index", "call", "module", "inputs"}``, each
    input ``(key bytes, tensor or None when held, or (offset, strides) for a view of a held tensor)``; an
    inline payload lands in a tensor of the layout its
    plan (``plans[handle].layout``: ``(dtype, shape, numel, nbytes)`` per input) gives it. ``"error"`` and
    ``"message"`` say why a call is not runnable (unknown handle, over the payload cap, malformed). A
    ``CALL_NAMED`` frame adds ``"names"``: the output names, as hex keys."""
    if magic not in (CALL, CALL_NAMED):
        raise WireError(f"binary frame {magic:#x} is not a call")
    handle, index, call, module_len, n = reader.unpack(_CALL_REST)
    header = {"kind": "call", "index": index, "call": call}
    raw = reader.take(module_len)
    try:
        header["module"] = str(raw, "utf-8")
    except UnicodeDecodeError:
        _refuse(header, "malformed", "call: the module name is not UTF-8")
    layout = plans[handle].layout if handle < len(plans) else None
    if layout is None:
        _refuse(header, "unknown-handle", f"call: no plan {handle}")
    elif n != len(layout):
        _refuse(header, "malformed", f"call: {n} inputs, {len(layout)} expected")
    else:
        header["plan"] = plans[handle]
    inputs = header["inputs"] = []
    for i in range(n):
        kind, key, nbytes = reader.unpack(_INPUT)
        if kind == HELD:
            if nbytes:
                _refuse(header, "malformed", "call: a held input carries no payload")
            inputs.append((key, None))
            continue
        if kind == VIEW:
            (rank,) = reader.unpack(_RANK)
            raw = bytes(reader.take(8 * rank))  # read before judging it: the channel stays in step
            if rank > MAX_NDIM or layout is None or i >= len(layout) or rank != len(layout[i][1]):
                _refuse(header, "malformed", f"call: a view input of rank {rank} for input {i}")
                inputs.append((key, None))
            else:
                inputs.append((key, (nbytes, _DIMS[rank].unpack(raw))))
            continue
        if kind != INLINE:
            raise WireError(f"call: input kind {kind} is unknown")
        if max_payload is not None and nbytes > max_payload:
            _refuse(header, "refused", f"a {nbytes}-byte tensor exceeds the worker's payload cap of {max_payload} "
                    "bytes")
        elif "error" not in header and nbytes != layout[i][3]:
            dtype, shape = layout[i][:2]
            _refuse(header, "malformed", f"input {key.hex()}: {nbytes} bytes do not hold {list(shape)} {dtype}")
        if "error" in header:
            reader.discard(nbytes)  # the channel stays in step
            inputs.append((key, None))
            continue
        t = torch.empty(layout[i][1], dtype=layout[i][0])  # kept by the worker: the payload lands in it directly
        if nbytes:
            reader.read_into(byte_view(t))
        inputs.append((key, t))
    if magic == CALL_NAMED:
        (count,) = reader.unpack(_COUNT)
        raw = bytes(reader.take(16 * count))  # at most 1 MiB: u16 names
        if count > MAX_INPUTS:
            _refuse(header, "malformed", f"call: {count} output names")
        header["names"] = [raw[16 * k:16 * k + 16].hex() for k in range(count)]
    return header


def _refuse(header: dict, error: str, message: str) -> None:
    if "error" not in header:  # the first reason stands
        header["error"], header["message"] = error, message


def output_buffers(outputs: list[tuple[bytes, torch.Tensor, memoryview | None]], kernel_s: float) -> list | None:
    """An outputs frame as buffers for ``send_buffers`` (payloads straight from tensor memory), or None when
    an output's dtype has no code or its rank is over the limit (then the JSON frames carry it)."""
    if len(outputs) > MAX_INPUTS:
        return None
    buffers: list = [_OUTPUTS.pack(OUTPUTS, kernel_s, len(outputs))]
    for key, t, view in outputs:
        code, ndim = _CODES.get(t.dtype), t.dim()
        if code is None or ndim > MAX_NDIM:
            return None
        nbytes = 0 if view is None else view.nbytes
        buffers.append(_OUTPUT.pack(code, ndim, nbytes, key) + _DIMS[ndim].pack(*t.shape))
        if nbytes:
            buffers.append(view)
    return buffers


def read_outputs(reader: FrameReader, magic: int, max_payload: int | None, into: list | None = None) -> dict:
    """An outputs frame (after its magic): ``{"kind": "outputs", "ok": True, "kernel_s", "outputs"}``, each
    output ``(key, tensor)``. A worker that breaks the layout is a ``WireError``: the client recovers.
    ``into``: per output a contiguous tensor to receive it in place when it has that dtype and shape (a
    pipelined run's placeholder), else None."""
    if magic != OUTPUTS:
        raise WireError(f"binary frame {magic:#x} is not an outputs frame")
    kernel_s, n = reader.unpack(_OUTPUTS_REST)
    if n > MAX_INPUTS:
        raise WireError(f"outputs: {n} outputs")
    outputs = []
    for _ in range(n):
        code, ndim, nbytes, key = reader.unpack(_OUTPUT)
        if code >= len(DTYPES) or ndim > MAX_NDIM:
            raise WireError(f"outputs: dtype code {code}, rank {ndim}")
        shape = reader.unpack(_DIMS[ndim])
        dtype, numel = DTYPES[code], 1
        for s in shape:
            if s < 0:
                raise WireError(f"outputs: shape {shape}")
            numel *= s
        if numel * dtype.itemsize != nbytes or (max_payload is not None and nbytes > max_payload):
            raise WireError(f"outputs: {nbytes} bytes for {shape} {dtype_name(dtype)}")
        t = into[len(outputs)] if into is not None and len(outputs) < len(into) else None
        if t is None or t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.storage_offset():
            t = torch.empty(shape, dtype=dtype)
        if nbytes:
            reader.read_into(byte_view(t))
        outputs.append((key.hex(), t))
    return {"kind": "outputs", "ok": True, "kernel_s": kernel_s, "outputs": outputs}


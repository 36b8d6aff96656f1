"""``tvm-webgpu``: TVM-compiled WGSL kernels run on a real WebGPU implementation (wgpu).

TVM's own WebGPU runtime is JavaScript, so this module is the Python runtime:
the op is exported and imported as for ``tvm-llvm``, legalized, scheduled with
the ``tvm.s_tir.dlight`` GPU rules and built for target ``webgpu``; the Relax
``main`` then says which kernels to launch on which buffers. Each kernel's WGSL
is dispatched through ``wgpu`` with its storage buffers bound by name and the
uniform argument block (``PODArgs``) last, on whatever adapter wgpu finds —
Mesa's lavapipe on a CPU-only machine, a real GPU elsewhere.

A unit (a whole module call) takes the same road after Relax's fusion passes
(``TVMPlatform.fuse``): the runtime walks the *fused* module's ``main``, one
launch group per fused kernel. Its launch plan (WGSL, bindings, grids, buffers)
is plain data, cached on disk as JSON by unit signature like ``tvm-llvm``'s
libraries. A unit with 64-bit integer or boolean tensors at its boundary is
refused in one line (WGSL storage has neither); the plan then descends to its
children, down to ops (whose int64 indices the op path narrows to int32).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from tapml.core import OpCall, UnitCall

from .base import Capabilities, KernelTrace, Support, Unsupported
from .tvm import TVMPlatform, _one_line, cache_dir

__all__ = ["TVMWebGPU"]

_SECTION = re.compile(r"// Function: (\w+)\n//-+\n")
_BINDING = re.compile(r"@binding\((\d+)\) var<storage, [\w_]+> (\w+)_ptr")
_WORKGROUP = re.compile(r"@workgroup_size\((\d+), (\d+), (\d+)\)")
_SHARED = re.compile(r"var<workgroup> \w+ : array<(\w+), (\d+)>")
_POD = re.compile(r"struct PODArgs \{([^}]*)\}")
_GRID = re.compile(r'T\.thread_binding\((?:T\.int64\()?(\d+)\)?, thread="blockIdx\.([xyz])"\)')
_WGSL_DTYPES = {"float32": np.float32, "int32": np.int32, "float16": np.float16, "uint32": np.uint32}
_ELEMENT = {"f32": 4, "i32": 4, "u32": 4, "f16": 2}
_MAX_GROUPS = 65535


@dataclass
class _Launch:
    kernel: str
    wgsl: str
    bindings: list[tuple[int, tuple]]  # (binding slot, buffer ref)
    grid: tuple[int, int, int]
    pipeline: Any = None


@dataclass
class _Program:
    """Buffers and launches of one compiled op or unit; refs are ("in", i) or ("buf", j)."""

    buffers: list[tuple[tuple[int, ...], str]] = field(default_factory=list)
    launches: list[_Launch] = field(default_factory=list)
    outputs: list[tuple] = field(default_factory=list)
    calls: list[tuple[str, list[tuple]]] = field(default_factory=list)  # each call_tir: (PrimFunc, output refs)

    def to_json(self) -> dict:
        return {"buffers": [[list(s), d] for s, d in self.buffers], "outputs": [list(r) for r in self.outputs],
                "launches": [{"kernel": x.kernel, "wgsl": x.wgsl, "grid": list(x.grid),
                              "bindings": [[slot, list(ref)] for slot, ref in x.bindings]} for x in self.launches],
                "calls": [[name, [list(r) for r in refs]] for name, refs in self.calls]}

    @classmethod
    def from_json(cls, obj: dict) -> _Program:
        return cls([(tuple(s), d) for s, d in obj["buffers"]],
                   [_Launch(x["kernel"], x["wgsl"], [(slot, tuple(ref)) for slot, ref in x["bindings"]],
                            tuple(x["grid"])) for x in obj["launches"]],
                   [tuple(r) for r in obj["outputs"]], [(n, [tuple(r) for r in refs]) for n, refs in obj["calls"]])


def _grids(script: str) -> list[tuple[int, int, int]]:
    """blockIdx extents per kernel of a scheduled PrimFunc, in launch order."""
    grids, current = [], {}
    for extent, axis in _GRID.findall(script):
        if axis in current:
            grids.append(current)
            current = {}
        current[axis] = int(extent)
    if current:
        grids.append(current)
    return [(g.get("x", 1), g.get("y", 1), g.get("z", 1)) for g in grids]


class TVMWebGPU(TVMPlatform):
    name = "tvm-webgpu"
    description = "Apache TVM kernels compiled to WGSL, run through wgpu (WebGPU) on the first adapter"
    target: ClassVar[str] = "webgpu"
    _gpu: ClassVar[tuple | None] = None

    def __init__(self) -> None:
        super().__init__()
        self.adapter, self.device = self._device()

    @classmethod
    def _device(cls):
        if cls._gpu is None:
            import os

            # Mesa's drivers complain on stderr without a runtime dir; give them a private one, removed at exit
            # (made only when none is set: each worker process used to leave one behind in /tmp)
            if "XDG_RUNTIME_DIR" not in os.environ:
                import atexit
                import shutil
                import tempfile

                runtime = tempfile.mkdtemp(prefix="tapml-xdg-")
                os.environ["XDG_RUNTIME_DIR"] = runtime
                atexit.register(shutil.rmtree, runtime, ignore_errors=True)
            import wgpu

            adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
            features = [f for f in ("shader-f16",) if f in adapter.features]
            cls._gpu = (adapter, adapter.request_device_sync(required_features=features))
        return cls._gpu

    @classmethod
    def availability(cls) -> Support:
        base = super().availability()
        if not base:
            return base
        try:
            import wgpu  # noqa: F401
        except ImportError as e:
            return Support.no(f"wgpu is not importable: {e}")
        try:
            cls._device()
        except Exception as e:
            return Support.no(f"no WebGPU adapter: {_one_line(e)} (install Mesa's Vulkan driver: mesa-vulkan-drivers)")
        return Support.yes()

    def capabilities(self) -> Capabilities:
        info, limits = self.adapter.info, self.adapter.limits
        keys = ("max-storage-buffer-binding-size", "max-buffer-size", "max-compute-workgroup-storage-size",
                "max-compute-invocations-per-workgroup")
        dtypes = ("float32", "int32") + (("float16",) if "shader-f16" in self.adapter.features else ())
        return Capabilities(device=f"{info['device']} ({info['backend_type']}, {info['adapter_type']})",
                            dtypes=dtypes + ("int64",), int64=False, float64=False,
                            max_buffer_bytes=int(limits["max-storage-buffer-binding-size"]),
                            limits=tuple((k, int(limits[k])) for k in keys))

    def supports(self, op: OpCall) -> Support:
        base = super().supports(op)
        if not base:
            return base
        for spec in op.output_specs:
            if spec.dtype == "int64":
                return Support.no("int64 output: WGSL has no 64-bit integers")
        return Support.yes()

    # -- compile -------------------------------------------------------------------
    def compile(self, op: OpCall) -> Any:
        # int64 inputs (indices) are narrowed to int32; the range is checked at run time
        program = self._wgsl(self.import_op(op, narrow_int64=True), fuse=False)
        self.stats["builds"] += 1
        return program

    def _wgsl(self, mod, *, fuse: bool) -> _Program:
        """Legalize (and, for a unit, fuse), schedule with dlight, build each PrimFunc to WGSL, plan the launches."""
        import tvm
        import tvm.s_tir.dlight as dl
        from tvm import relax

        target = tvm.target.Target("webgpu", host="llvm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with target:
                mod = self.fuse(mod) if fuse else relax.transform.LegalizeOps()(mod)
            try:
                with target:
                    mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                                  dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
                # each PrimFunc alone: building the whole module would fuse them into other kernels
                sections = {}
                for gv, func in mod.functions.items():
                    if isinstance(func, relax.Function):
                        continue
                    built = tvm.compile(tvm.IRModule({gv.name_hint: func.with_attr("global_symbol", gv.name_hint)}),
                                        target=target)
                    if len(built.mod.imports):
                        parts = _SECTION.split(built.mod.imports[0].inspect_source())
                        sections.update({parts[i]: parts[i + 1] for i in range(1, len(parts), 2)})
            except Exception as e:
                raise Unsupported(f"TVM webgpu build: {_one_line(e)}") from None
        program = self._plan(mod, sections, relax)
        self._check_limits(program)
        return program

    def compile_graph(self, unit: UnitCall) -> Any:
        storable = set(self.capabilities().dtypes) - {"int64"}  # float16 only with the adapter's shader-f16
        for where, specs in (("input", unit.input_specs), ("output", unit.output_specs)):
            for spec in specs:
                if spec.dtype not in storable:
                    raise Unsupported(f"a {spec.dtype} unit {where}: WGSL storage has no {spec.dtype} on this adapter")
        parts = [self.name, self.target, self._tvm.__version__, torch.__version__, "unit", unit.signature]
        path = cache_dir() / "webgpu" / f"{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:32]}.json"
        if path.exists():
            try:
                program = _Program.from_json(json.loads(path.read_text()))
                self._check_limits(program)  # this adapter's limits, not the one that built it
                self.stats["disk_hits"] += 1
                return program
            except (ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)  # a stale or partial file: rebuild it
        program = self._wgsl(self.import_unit(unit), fuse=True)
        self.stats["builds"] += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(program.to_json()))
        os.replace(tmp, path)
        return program

    def _plan(self, mod, sections: dict[str, str], relax) -> _Program:
        main = mod["main"]
        env: dict[Any, Any] = {p: ("in", i) for i, p in enumerate(main.params)}
        program = _Program()

        def new_buffer(sinfo) -> tuple:
            if not isinstance(sinfo, relax.TensorType):
                raise Unsupported("a kernel output that is not a tensor")
            program.buffers.append((tuple(int(d) for d in sinfo.shape.values), str(sinfo.dtype)))
            return ("buf", len(program.buffers) - 1)

        for block in main.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir":
                    gv, args = value.args[0], [env[a] for a in value.args[1].fields]
                    out = value.ty_args[0]
                    outs = [new_buffer(s) for s in out.fields] if isinstance(out, relax.TupleType) \
                        else [new_buffer(out)]
                    prim = mod[gv]
                    refs = dict(zip([p.name for p in prim.params], args + outs, strict=True))
                    kernels = sorted((k for k in sections if k == f"{gv.name_hint}_kernel"
                                      or k.startswith(f"{gv.name_hint}_kernel_")),
                                     key=lambda k: (len(k), k))
                    grids = _grids(prim.script())
                    if len(kernels) != len(grids):
                        raise Unsupported(f"{gv.name_hint}: {len(kernels)} kernels but {len(grids)} launch grids")
                    for kernel, grid in zip(kernels, grids, strict=True):
                        wgsl = sections[kernel]
                        pod = _POD.search(wgsl)
                        if pod and pod.group(1).strip().rstrip(",") != "packGridDimX: u32":
                            raise Unsupported(f"{kernel} takes scalar arguments: {pod.group(1).strip()}")
                        binds = [(int(slot), refs[name]) for slot, name in _BINDING.findall(wgsl)]
                        program.launches.append(_Launch(kernel, wgsl, binds, grid))
                    program.calls.append((gv.name_hint, outs))
                    env[binding.var] = outs[0] if len(outs) == 1 else ("tuple", outs)
                elif isinstance(value, relax.Tuple):
                    env[binding.var] = ("tuple", [env[f] for f in value.fields])
                elif isinstance(value, relax.TupleGetItem):
                    env[binding.var] = env[value.tuple_value][1][value.index]
                elif isinstance(value, relax.Var):
                    env[binding.var] = env[value]
                else:
                    raise Unsupported(f"relax {getattr(value, 'op', type(value).__name__)} has no WebGPU launch")
        result = env[main.body.body]
        program.outputs = result[1] if result[0] == "tuple" else [result]
        return program

    def _check_limits(self, program: _Program) -> None:
        limits = self.adapter.limits
        for shape, dtype in program.buffers:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_WGSL_DTYPES.get(dtype, np.float32)).itemsize
            if nbytes > limits["max-storage-buffer-binding-size"]:
                raise Unsupported(f"a {nbytes}-byte buffer exceeds maxStorageBufferBindingSize "
                                  f"{limits['max-storage-buffer-binding-size']}")
            if dtype not in _WGSL_DTYPES:
                raise Unsupported(f"dtype {dtype} in a kernel buffer: not a WGSL storage type")
        for launch in program.launches:
            shared = sum(_ELEMENT.get(t, 4) * int(n) for t, n in _SHARED.findall(launch.wgsl))
            if shared > limits["max-compute-workgroup-storage-size"]:
                raise Unsupported(f"{launch.kernel} needs {shared} bytes of workgroup storage, more than "
                                  f"maxComputeWorkgroupStorageSize {limits['max-compute-workgroup-storage-size']}")
            size = _WORKGROUP.search(launch.wgsl)
            threads = int(np.prod([int(x) for x in size.groups()])) if size else 1
            if threads > limits["max-compute-invocations-per-workgroup"]:
                most = limits["max-compute-invocations-per-workgroup"]
                raise Unsupported(f"{launch.kernel} needs {threads} invocations per workgroup, more than "
                                  f"maxComputeInvocationsPerWorkgroup {most}")

    # -- run -----------------------------------------------------------------------
    def run(self, kernel: _Program, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        gpu_in, gpu_buf = self._dispatch(kernel, inputs)
        outputs = []
        for ref in kernel.outputs:
            if ref[0] == "in":  # the op returned an input unchanged
                outputs.append(inputs[ref[1]].clone())
            else:
                outputs.append(self._read(kernel, gpu_buf, ref[1]))
        return outputs

    def run_graph(self, kernel: _Program, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.run(kernel, None, inputs)

    def trace_graph(self, kernel: _Program, unit: UnitCall, inputs: list[torch.Tensor]) -> KernelTrace:
        """Each fused kernel's outputs, in launch order: every kernel writes buffers of its own (none is
        reused), so reading them all back after one submission sees what each kernel wrote."""
        _, gpu_buf = self._dispatch(kernel, inputs)
        return [(name, [self._read(kernel, gpu_buf, ref[1]) for ref in refs if ref[0] == "buf"])
                for name, refs in kernel.calls]

    def _read(self, kernel: _Program, gpu_buf: list, j: int) -> torch.Tensor:
        shape, dtype = kernel.buffers[j]
        raw = self.device.queue.read_buffer(gpu_buf[j])[: _nbytes(shape, dtype)]
        return torch.from_numpy(np.frombuffer(raw, dtype=_WGSL_DTYPES[dtype]).copy()).reshape(shape)

    def _dispatch(self, kernel: _Program, inputs: list[torch.Tensor]) -> tuple[list, list]:
        """Upload the inputs, run every launch in one submission; the input and kernel buffers."""
        import wgpu

        device = self.device
        usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
        gpu_in = []
        for t in inputs:
            t = t.detach().contiguous()
            if t.dtype == torch.int64:
                if t.numel() and (t.max() > 2**31 - 1 or t.min() < -(2**31)):
                    raise Unsupported("int64 values beyond the int32 range: WGSL has no 64-bit integers")
                t = t.to(torch.int32)
            data = t.numpy() if t.numel() else np.zeros(1, dtype=np.float32)
            gpu_in.append(device.create_buffer_with_data(data=data.tobytes() + b"\0" * (-data.nbytes % 4), usage=usage))
        gpu_buf = [device.create_buffer(size=max(4, _nbytes(shape, dtype) + (-_nbytes(shape, dtype) % 4)),
                                        usage=usage) for shape, dtype in kernel.buffers]

        def resolve(ref):
            return gpu_in[ref[1]] if ref[0] == "in" else gpu_buf[ref[1]]

        encoder = device.create_command_encoder()
        keep = []
        for launch in kernel.launches:
            if launch.pipeline is None:
                module = device.create_shader_module(code=launch.wgsl)
                launch.pipeline = device.create_compute_pipeline(
                    layout="auto", compute={"module": module, "entry_point": launch.kernel})
            gx, gy, gz = launch.grid
            dx, dz = (gx, gz) if gx <= _MAX_GROUPS else (_MAX_GROUPS, -(-gx // _MAX_GROUPS))
            pod = device.create_buffer_with_data(data=np.array([gx - 1, 0, 0, 0], dtype=np.uint32),
                                                 usage=wgpu.BufferUsage.UNIFORM)
            entries = [{"binding": slot, "resource": {"buffer": resolve(ref), "offset": 0,
                                                      "size": resolve(ref).size}}
                       for slot, ref in launch.bindings]
            entries.append({"binding": len(launch.bindings), "resource": {"buffer": pod, "offset": 0,
                                                                          "size": pod.size}})
            group = device.create_bind_group(layout=launch.pipeline.get_bind_group_layout(0), entries=entries)
            keep += [pod, group]
            compute = encoder.begin_compute_pass()
            compute.set_pipeline(launch.pipeline)
            compute.set_bind_group(0, group)
            compute.dispatch_workgroups(dx, gy, dz)
            compute.end()
        device.queue.submit([encoder.finish()])
        return gpu_in, gpu_buf


def _nbytes(shape, dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(_WGSL_DTYPES.get(dtype, np.float32)).itemsize

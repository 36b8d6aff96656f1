"""Platforms that misbehave on purpose, loaded by workers as FILE.py:Class.

The op index to misbehave on comes from TAPML_TEST_OP_INDEX, so a test picks it.
"""

import os
import signal
import time

from tapml.platforms import Support, TorchPlatform, WrappedPlatform


def _target(op) -> bool:
    return op.index == int(os.environ.get("TAPML_TEST_OP_INDEX", "-1"))


class KillSelf(TorchPlatform):
    """SIGKILLs its own process on one op: a segfault or OOM kill, as far as the client can tell.

    With TAPML_TEST_KILL_ONCE=FILE only the first worker to reach the op dies (it creates FILE),
    so a pool of devices sharing the setting loses exactly one."""

    name = "kill-self"

    def run(self, kernel, op, inputs):
        if _target(op):
            once = os.environ.get("TAPML_TEST_KILL_ONCE")
            if once is None:
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL))
                os.kill(os.getpid(), signal.SIGKILL)
            except FileExistsError:
                pass
        return super().run(kernel, op, inputs)


class Hang(TorchPlatform):
    """Never returns from one op: a hung kernel."""

    name = "hang"

    def run(self, kernel, op, inputs):
        if _target(op):
            time.sleep(3600)
        return super().run(kernel, op, inputs)


class NotAPlatform:
    pass


class GeluNaNAbove8(TorchPlatform):
    """A GELU kernel whose approximation breaks down for large inputs (like Metal's tanh
    returning NaN for x > ~45): NaN wherever x > 8. Only realistic activations get there."""

    name = "gelu-nan-above-8"

    def run(self, kernel, op, inputs):
        outputs = super().run(kernel, op, inputs)
        if op.op == "aten.gelu.default":
            outputs = [o.masked_fill(inputs[0] > 8, float("nan")) for o in outputs]
        return outputs


class NoSoftmax(TorchPlatform):
    """A target without a softmax kernel."""

    name = "no-softmax"

    def supports(self, op):
        if op.op == "aten._softmax.default":
            return Support.no("no softmax kernel on this target yet")
        return super().supports(op)


class SecondDecodeLogits(TorchPlatform):
    """Pushes one vocabulary entry's logit up in lm_head's third call (decode step 2)."""

    name = "second-decode-logits"

    def run(self, kernel, op, inputs):
        outputs = super().run(kernel, op, inputs)
        if op.module == "lm_head" and op.call == 2 and op.op in ("aten.mm.default", "aten.addmm.default"):
            outputs = [o.clone() for o in outputs]
            outputs[0][..., 5] += 100.0
        return outputs


class FusionBug(WrappedPlatform):
    """torch-cpu, except that encoder layer 2 compiled whole (a unit) comes out 2% too large: every
    child module and op of it is right alone — a graph-level defect."""

    name = "fusion-bug"
    inner = "torch-cpu"

    def run_graph(self, kernel, unit, inputs):
        outputs = super().run_graph(kernel, unit, inputs)
        if unit.module == "encoder.layer.2":
            outputs = [t * 1.02 if t.is_floating_point() else t for t in outputs]
        return outputs


def _misfused():
    from tapml.platforms.tvm import TVMLLVM

    class MisfusedGelu(TVMLLVM):
        """tvm-llvm whose compiled units scale every GELU by 1.01 before fusion: the fused kernel that
        computes it (``fused_..._gelu_multiply...``) is wrong; per-op kernels are right."""

        name = "tvm-misfused-gelu"

        def fuse(self, mod):
            import tvm
            from tvm import relax

            @relax.expr_functor.mutator
            class Perturb(relax.PyExprMutator):
                def visit_call_(self, call):
                    call = super().visit_call_(call)
                    if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.gelu":
                        return relax.op.multiply(call, relax.const(1.01, "float32"))
                    return call

            for gv, func in list(mod.functions.items()):
                if isinstance(func, relax.Function):
                    mod[gv] = Perturb().visit_expr(func)
            return super().fuse(mod)
        # its compile cache keys include its own name: nothing is shared with tvm-llvm

    return MisfusedGelu


try:
    MisfusedGelu = _misfused()
except ImportError:  # no TVM: the test that uses it skips
    MisfusedGelu = None


class UnitRaises(WrappedPlatform):
    """torch-cpu whose compiled encoder.layer.1 raises when run (a kernel fault of the compiled unit)."""

    name = "unit-raises"
    inner = "torch-cpu"

    def run_graph(self, kernel, unit, inputs):
        if unit.module == "encoder.layer.1":
            raise RuntimeError("illegal memory access in the fused kernel")
        return super().run_graph(kernel, unit, inputs)


class TanhUlps(WrappedPlatform):
    """torch-cpu whose compiled pooler units return tanh 14 ULPs off: beyond the unit rule (4× the
    reference's distance from float64), within tanh's own bound (16 ULPs) — a legitimate libm."""

    name = "tanh-ulps"
    inner = "torch-cpu"

    def run_graph(self, kernel, unit, inputs):
        import torch

        outputs = super().run_graph(kernel, unit, inputs)
        if unit.module.startswith("pooler"):
            for k, t in enumerate(outputs):
                for _ in range(14):
                    t = torch.nextafter(t, torch.full_like(t, 2.0))
                outputs[k] = t
        return outputs


class Raises(TorchPlatform):
    """A kernel that raises on one op (a launch failure the worker survives)."""

    name = "raises"

    def run(self, kernel, op, inputs):
        if _target(op):
            raise RuntimeError("kernel launch failed")
        return super().run(kernel, op, inputs)


class Reshaped(TorchPlatform):
    """One op's first output comes back in another shape with the same element count: a later op on the
    worker that takes it by name would read it reshaped, so the engine must not keep that later answer."""

    name = "reshaped"

    def run(self, kernel, op, inputs):
        outputs = super().run(kernel, op, inputs)
        if _target(op):
            outputs = [outputs[0].reshape(-1), *outputs[1:]]
        return outputs


class OneUlp(TorchPlatform):
    """One op's first output comes back one ULP up in its first element: within tolerance, not bit-exact
    (its content key is no longer the carved one)."""

    name = "one-ulp"

    def run(self, kernel, op, inputs):
        import torch

        outputs = super().run(kernel, op, inputs)
        if _target(op):
            first = outputs[0].clone().reshape(-1)
            first[0] = torch.nextafter(first[0], torch.tensor(float("inf"), dtype=first.dtype))
            outputs = [first.reshape(outputs[0].shape), *outputs[1:]]
        return outputs


class UlpAndReshaped(OneUlp):
    """One op's first output comes back one ULP up (its shape kept: received in its placeholder) and its
    second in another shape: the op falls back, and the reference's values overwrite the first."""

    name = "ulp-and-reshaped"

    def run(self, kernel, op, inputs):
        outputs = super().run(kernel, op, inputs)
        if _target(op):
            outputs = [outputs[0], outputs[1].reshape(-1, 1), *outputs[2:]]
        return outputs


class PickyUnits(WrappedPlatform):
    """torch-cpu whose compiled units misbehave by module: encoder layer 1 (or the modules in
    TAPML_TEST_REFUSE_UNITS, comma-separated) is refused when it runs, layer 3 answers with wrong shapes,
    layer 5 with doubled values, and layer 4 kills the worker when TAPML_TEST_KILL_UNIT is set — each the
    way a real compiler's unit can fail."""

    name = "picky-units"
    inner = "torch-cpu"

    def run_graph(self, kernel, unit, inputs):
        from tapml.platforms import Unsupported

        if unit.module in os.environ.get("TAPML_TEST_REFUSE_UNITS", "encoder.layer.1").split(","):
            raise Unsupported("not this one")
        if unit.module == "encoder.layer.4" and os.environ.get("TAPML_TEST_KILL_UNIT"):
            os.kill(os.getpid(), signal.SIGKILL)
        outputs = super().run_graph(kernel, unit, inputs)
        if unit.module == "encoder.layer.3":
            return [o[..., :1] for o in outputs]
        if unit.module == "encoder.layer.5":
            return [o * 2 for o in outputs]
        return outputs


class LostAtUnit(WrappedPlatform):
    """torch-cpu that kills its worker on unit TAPML_TEST_KILL_UNIT once TAPML_TEST_ARMED (a file) exists,
    and leaves the file TAPML_TEST_DEAD behind: no worker starts after that — the target is lost."""

    name = "lost-at-unit"
    inner = "torch-cpu"

    def __init__(self) -> None:
        if os.path.exists(os.environ["TAPML_TEST_DEAD"]):
            raise RuntimeError("this machine is gone")
        super().__init__()

    def run_graph(self, kernel, unit, inputs):
        if unit.module == os.environ["TAPML_TEST_KILL_UNIT"] and os.path.exists(os.environ["TAPML_TEST_ARMED"]):
            open(os.environ["TAPML_TEST_DEAD"], "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run_graph(kernel, unit, inputs)

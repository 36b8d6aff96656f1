"""Platforms that misbehave on purpose, loaded by workers as FILE.py:Class.

The op index to misbehave on comes from TAPML_TEST_OP_INDEX, so a test picks it.
"""

import os
import signal
import time

from tapml.platforms import Support, TorchPlatform


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

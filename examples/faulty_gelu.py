from tapml.platforms import WrappedPlatform


class FaultyGelu(WrappedPlatform):
    """torch-cpu, except that the GELU of encoder layer 3 comes out 1% too large."""

    name = "faulty-gelu"
    inner = "torch-cpu"
    module = "encoder.layer.3.intermediate.intermediate_act_fn"

    def run(self, kernel, op, inputs):
        outputs = super().run(kernel, op, inputs)
        if op.op == "aten.gelu.default" and op.module == self.module:
            outputs = [t * 1.01 for t in outputs]
        return outputs

"""``FaultyGelu`` inside compiled units too (``--plan top-down``): the same 1% GELU fault in layer 3,
whether the op runs alone or inside a module compiled as one unit."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faulty_gelu import FaultyGelu  # noqa: E402

from tapml.platforms import UnitProgram  # noqa: E402


class FaultyGeluUnits(FaultyGelu):
    name = "faulty-gelu-units"

    def compile_graph(self, unit):
        # torch-cpu builds a unit's program per call: each call's nodes know the module they ran in
        return lambda unit: _FaultyProgram(unit, self.module)


class _FaultyProgram(UnitProgram):
    def __init__(self, unit, module):
        super().__init__(unit)
        self.module = module

    def node(self, call, args, kwargs):
        out = super().node(call, args, kwargs)
        return out * 1.01 if call.op == "aten.gelu.default" and call.module == self.module else out

"""A carved call written back as Python source: names from the op's schema, values as literals."""

from __future__ import annotations

import pytest
import torch

from tapml.callsource import call_source, tensor_names
from tapml.core import OpCall, TapmlError


def spec(shape):
    return {"tensor": {"dtype": "float32", "shape": list(shape), "stride": [1] * len(shape) if shape else []}}


def call(op, args, kwargs=None, outputs=None):
    return OpCall(op=op, args=args, kwargs={"dict": kwargs or {}}, outputs=outputs or spec([2]))


def test_names_come_from_the_schema_and_self_reads_as_x():
    op = call("aten.addmm.default", [spec([2]), spec([2, 3]), spec([3, 2])], {"beta": 0.5})
    assert tensor_names(op) == ["x", "mat1", "mat2"]
    assert call_source(op) == "torch.ops.aten.addmm.default(x, mat1, mat2, beta=0.5)"


def test_lists_of_tensors_and_literals():
    op = call("aten.cat.default", [[spec([2]), spec([2])], 0])
    assert call_source(op) == "torch.ops.aten.cat.default([tensors_0, tensors_1], 0)"
    op = call("aten.full.default", [[2, 3], {"float": "-inf"}],
              {"dtype": {"dtype": "float16"}, "device": {"device": "cpu"}, "pin_memory": False})
    text = call_source(op, [])
    assert text == ("torch.ops.aten.full.default([2, 3], float('-inf'), dtype=torch.float16, "
                    "device=torch.device('cpu'), pin_memory=False)")
    assert eval(text, {"torch": torch}).dtype == torch.float16  # the source runs


def test_an_opaque_argument_cannot_be_written():
    op = call("aten.bernoulli.default", [spec([2])], {"generator": {"opaque": "Generator"}})
    with pytest.raises(TapmlError, match="cannot write opaque"):
        call_source(op)

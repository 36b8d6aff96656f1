"""Offload plans on synthetic stores: which ops move in which step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tapml.core import TapmlError
from tapml.engine import find_blocks, make_plan


def fake_store(modules: list[str], layers: list[str]):
    ops = [{"index": i, "op": "aten.add.Tensor" if i % 2 else "aten.mul.Tensor", "module": m}
           for i, m in enumerate(modules)]
    return SimpleNamespace(ops=ops, layers=[{"module": m} for m in layers])


ENCODER = fake_store(
    ["embeddings", "embeddings", "encoder.layer.0.attn", "encoder.layer.0.ffn", "encoder.layer.1.attn",
     "encoder.layer.1.ffn", "pooler"],
    ["", "embeddings", "encoder", "encoder.layer.0", "encoder.layer.0.attn", "encoder.layer.0.ffn",
     "encoder.layer.1", "encoder.layer.1.attn", "encoder.layer.1.ffn", "pooler"])


def test_repeated_blocks_are_found():
    assert find_blocks(ENCODER) == ["encoder.layer.0", "encoder.layer.1"]
    assert find_blocks(fake_store(["a"], ["", "a"])) == []


def test_layers_plan_is_cumulative_with_before_and_after():
    steps = make_plan(ENCODER, "layers")
    assert [s["name"] for s in steps] == ["+ before encoder.layer.0", "+ encoder.layer.0", "+ encoder.layer.1",
                                          "+ after encoder.layer.1"]
    assert [s["offload"] for s in steps] == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6]]


def test_single_ops_and_all_plans():
    assert [s["offload"] for s in make_plan(ENCODER, "single")] == [[0, 1], [2, 3], [4, 5], [6]]
    by_op = make_plan(ENCODER, "ops")
    assert [s["name"] for s in by_op] == ["aten.mul.Tensor", "aten.add.Tensor"]
    assert by_op[0]["offload"] == [0, 2, 4, 6]
    (everything,) = make_plan(ENCODER, "all")
    assert everything["offload"] == list(range(7))


def test_a_layers_regex_keeps_the_outermost_matches():
    steps = make_plan(ENCODER, "layers", r"encoder\.layer\.\d+(\.attn)?")
    assert [s["name"] for s in steps][1:3] == ["+ encoder.layer.0", "+ encoder.layer.1"]


def test_bad_plans_are_user_errors():
    with pytest.raises(TapmlError, match="unknown plan"):
        make_plan(ENCODER, "sideways")
    with pytest.raises(TapmlError, match="not a valid regex"):
        make_plan(ENCODER, "layers", "(")


def test_blocks_are_the_heaviest_families_not_the_most_numerous():
    # two norms beside two attention layers (ape-attention): the layers are the blocks
    ape = fake_store(["norms.0", "layers.0.qkv", "layers.0.out", "layers.0.out", "norms.1", "layers.1.qkv",
                      "layers.1.out", "layers.1.out"],
                     ["", "norms.0", "layers.0", "layers.0.qkv", "layers.0.out", "norms.1", "layers.1",
                      "layers.1.qkv", "layers.1.out"])
    assert find_blocks(ape) == ["layers.0", "layers.1"]
    # an encoder's and a decoder's layers (bart, whisper): both families, in call order; the heads inside not
    seq2seq = fake_store(["encoder.layers.0", "encoder.layers.1", "decoder.layers.0.heads.0",
                          "decoder.layers.0.heads.1", "decoder.layers.1.heads.0", "decoder.layers.1.heads.1"],
                         ["", "encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.0.heads.0",
                          "decoder.layers.0.heads.1", "decoder.layers.1", "decoder.layers.1.heads.0",
                          "decoder.layers.1.heads.1"])
    assert find_blocks(seq2seq) == ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1"]
    # a root Sequential's numbered children hold numbered children of their own: the outer ones
    nested = fake_store(["0.1", "0.1", "1.1", "1.1"], ["", "0", "0.0", "0.1", "1", "1.0", "1.1"])
    assert find_blocks(nested) == ["0", "1"]

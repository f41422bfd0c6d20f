"""ort_quantize.output_head: the MatMuls that write a causal LM's logits (int4 quantises them in int8 blocks)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from qbuild.backends.ort_quantize import output_head


def _graph(nodes: list, outputs: list[str], weights: list[str]):  # noqa: ANN202
    inits = [numpy_helper.from_array(np.zeros((4, 4), np.float32), w) for w in weights]
    inputs = [helper.make_tensor_value_info(n, T.FLOAT, [1, 4]) for n in ("x", "position_ids")]
    return helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, T.FLOAT, None) for o in outputs],
                             inits)


def test_a_head_split_along_the_vocabulary_and_nothing_before_it() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w_body"], ["h"], name="body"),
             helper.make_node("MatMul", ["h", "w0"], ["p0"], name="page0"),
             helper.make_node("MatMul", ["h", "w1"], ["p1"], name="page1"),
             helper.make_node("Concat", ["p0", "p1"], ["all"], name="concat", axis=-1),
             helper.make_node("ArgMax", ["position_ids"], ["last"], name="argmax"),
             helper.make_node("Gather", ["all", "last"], ["logits"], name="gather", axis=1)]
    assert output_head(_graph(nodes, ["logits"], ["w_body", "w0", "w1"])) == ["page0", "page1"]


def test_softcapped_logits() -> None:  # Gemma's final logit soft-capping sits between the head and logits
    nodes = [helper.make_node("MatMul", ["x", "w_body"], ["h"], name="body"),
             helper.make_node("MatMul", ["h", "w"], ["raw"], name="head"),
             helper.make_node("Div", ["raw", "x"], ["d"], name="div"),
             helper.make_node("Tanh", ["d"], ["t"], name="tanh"),
             helper.make_node("Mul", ["t", "x"], ["logits"], name="mul")]
    assert output_head(_graph(nodes, ["logits"], ["w_body", "w"])) == ["head"]
    for node in nodes[2:]:  # unnamed nodes on the way are walked all the same
        node.name = ""
    assert output_head(_graph(nodes, ["logits"], ["w_body", "w"])) == ["head"]


def test_no_logits_output_and_a_head_of_computed_weights() -> None:
    body = helper.make_node("MatMul", ["x", "w"], ["y"], name="body")
    assert output_head(_graph([body], ["sentence_embedding"], ["w"])) == []  # an encoder: no head
    # a tied head whose weight is computed at run time is no constant MatMul: nothing to quantise, and the walk
    # stops there rather than reaching the body behind it
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="body"),
             helper.make_node("Transpose", ["w"], ["wt"], name="tied"),
             helper.make_node("MatMul", ["h", "wt"], ["logits"], name="head")]
    assert output_head(_graph(nodes, ["logits"], ["w"])) == []

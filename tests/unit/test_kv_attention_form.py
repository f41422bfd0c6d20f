"""The ONNX Runtime backend reads the KV attention form from the graph itself (session.json's ``kv_attention``)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

from qbuild.backends.onnxruntime import kv_attention
from qbuild.errors import CompileError

SHAPE = [1, 2, 8, 4]


def _save(tmp_path: Path, nodes: list[onnx.NodeProto], outputs: list[str]) -> Path:
    inputs = [helper.make_tensor_value_info(n, T.FLOAT, SHAPE) for n in ("q", "k", "v", "past_key.0", "past_value.0")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(n, T.FLOAT, None) for n in outputs])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def _gqa(outputs: list[str]) -> onnx.NodeProto:
    return helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key.0", "past_value.0"], outputs,
                            domain="com.microsoft", num_heads=2, kv_num_heads=2)


def test_caches_written_by_group_query_attention(tmp_path: Path) -> None:
    path = _save(tmp_path, [_gqa(["out", "past_key.0_RetainedState", "past_value.0_RetainedState"])],
                 ["out", "past_key.0_RetainedState", "past_value.0_RetainedState"])
    assert kv_attention(path) == "group_query"


def test_plain_graph_has_no_form(tmp_path: Path) -> None:
    nodes = [helper.make_node("Identity", [f"past_{kv}.0"], [f"past_{kv}.0_RetainedState"]) for kv in ("key", "value")]
    nodes.append(helper.make_node("Add", ["q", "k"], ["out"]))
    path = _save(tmp_path, nodes, ["out", "past_key.0_RetainedState", "past_value.0_RetainedState"])
    assert kv_attention(path) is None


def test_mixed_graph_is_refused(tmp_path: Path) -> None:
    """One layer in place and another double-buffered cannot be bound either way: a clear error, not wrong tokens."""
    nodes = [_gqa(["out", "past_key.0_RetainedState", "past_value.0_RetainedState"]),
             helper.make_node("Identity", ["k"], ["past_key.1_RetainedState"])]
    path = _save(tmp_path, nodes, ["out", "past_key.0_RetainedState", "past_value.0_RetainedState",
                                   "past_key.1_RetainedState"])
    with pytest.raises(CompileError, match=r"past_key\.1_RetainedState not written by it"):
        kv_attention(path)


def test_group_query_attention_without_caches_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, [_gqa(["out", "pk", "pv"])], ["out"])
    with pytest.raises(CompileError, match="no retained-state outputs"):
        kv_attention(path)

"""``legacy_export`` (issue 16) writes the same ONNX model as a plain ``torch.onnx.export(dynamo=False)``.

It keeps the weights out of shape inference and out of the protobuf and writes them once as external data. The
graph must come out node for node the same, every initializer the same name, type, shape and bytes, and ONNX
Runtime must give the same outputs. Checked for a KV Llama, a KV GPT-2 (tied head, Conv1D weights), a plain
causal LM (bf16 weights too) and a mean-pooled BERT encoder; plus the data file's layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.func.test_kv_cache import tiny_model

pytestmark = pytest.mark.slow


def _export_both(tmp_path: Path, module: Any, args: tuple[Any, ...], **kwargs: Any) -> tuple[Path, Path]:
    import torch

    from qbuild.tasks.export_common import legacy_export, quiet

    plain, lean = tmp_path / "plain", tmp_path / "lean"
    plain.mkdir()
    lean.mkdir()
    with quiet():
        torch.onnx.export(module, args, str(plain / "model.onnx"), dynamo=False, do_constant_folding=True, **kwargs)
        legacy_export(module, args, lean / "model.onnx", do_constant_folding=True, **kwargs)
    return plain / "model.onnx", lean / "model.onnx"


def _assert_same_model(plain: Path, lean: Path) -> None:
    import onnx
    from onnx import numpy_helper

    a, b = onnx.load(str(plain)), onnx.load(str(lean))  # b's external data resolved beside it
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert [i.SerializeToString() for i in a.graph.input] == [i.SerializeToString() for i in b.graph.input]
    assert [o.SerializeToString() for o in a.graph.output] == [o.SerializeToString() for o in b.graph.output]
    assert list(a.opset_import) == list(b.opset_import)
    ia = {t.name: t for t in a.graph.initializer}
    ib = {t.name: t for t in b.graph.initializer}
    assert list(ia) == list(ib)  # the same names in the same order
    for name, ta in ia.items():
        tb = ib[name]
        assert (ta.data_type, list(ta.dims)) == (tb.data_type, list(tb.dims)), name
        va, vb = numpy_helper.to_array(ta), numpy_helper.to_array(tb)
        assert va.dtype == vb.dtype and va.tobytes() == vb.tobytes(), name


def _assert_same_outputs(plain: Path, lean: Path, feed: dict[str, np.ndarray]) -> None:
    import onnxruntime as ort

    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed) for p in (plain, lean)]
    for x, y in zip(*outs, strict=True):
        np.testing.assert_array_equal(x, y)


def _kv(family: str, tmp_path: Path) -> None:
    from qbuild.tasks.kv_causal_lm import _axes, _wrapper, example_inputs, io_names
    from qbuild.transforms import apply_transforms

    model = tiny_model(family)
    apply_transforms(model, ("kv_cache",))
    names = io_names(model.kv_num_layers())
    wrapper, args = _wrapper(model, model.kv_num_layers()), example_inputs(model)
    plain, lean = _export_both(tmp_path, wrapper, args, input_names=names[0], output_names=names[1],
                               dynamic_axes=_axes(*names), opset_version=17)
    _assert_same_model(plain, lean)
    _assert_same_outputs(plain, lean, {n: a.numpy() for n, a in zip(names[0], args, strict=True)})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_export_is_the_plain_exporters(family: str, tmp_path: Path) -> None:
    _kv(family, tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_causal_lm_export_is_the_plain_exporters(dtype: str, tmp_path: Path) -> None:
    import torch

    from qbuild.tasks.causal_lm import INPUT_NAMES, OUTPUT_NAMES, _logits_module
    from qbuild.tasks.export_common import example_inputs

    model = tiny_model("llama").to(getattr(torch, dtype))
    args = example_inputs(int(model.config.vocab_size))
    axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    plain, lean = _export_both(tmp_path, _logits_module(model), args, input_names=list(INPUT_NAMES),
                               output_names=list(OUTPUT_NAMES), dynamic_axes=axes, opset_version=17)
    _assert_same_model(plain, lean)
    if dtype == "float32":  # ONNX Runtime's CPU provider has no bf16 Where: neither file runs there
        _assert_same_outputs(plain, lean, {n: a.numpy() for n, a in zip(INPUT_NAMES, args, strict=True)})


def test_embedding_export_is_the_plain_exporters(tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModel

    from qbuild.tasks.embedding import INPUT_NAMES
    from qbuild.tasks.export_common import example_inputs
    from qbuild.transforms.pooling import Pooling, pooled_module

    config = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=1000)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    wrapper = pooled_module(model, Pooling("mean", True, "test"))
    args = example_inputs(1000)
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "seq"} for n in INPUT_NAMES}
    plain, lean = _export_both(tmp_path, wrapper, args, input_names=list(INPUT_NAMES), output_names=["out"],
                               dynamic_axes={**axes, "out": {0: "batch"}}, opset_version=17)
    _assert_same_model(plain, lean)
    _assert_same_outputs(plain, lean, {n: a.numpy() for n, a in zip(INPUT_NAMES, args, strict=True)})


def test_weights_are_external_aligned_and_not_in_the_graph_file(tmp_path: Path) -> None:
    import onnx

    from qbuild.tasks import export_common as ec

    _kv("llama", tmp_path)
    lean = tmp_path / "lean" / ec.MODEL_FILE
    data = lean.with_name(ec.DATA_FILE)
    model = onnx.load(str(lean), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "no weight was written as external data"
    spans = []
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        offset, length = int(info["offset"]), int(info["length"])
        assert info["location"] == ec.DATA_FILE and length >= ec.EXTERNAL_MIN_BYTES
        if length >= ec._ALIGN_MIN_BYTES:
            assert offset % ec._ALIGN == 0, t.name
        spans.append((offset, offset + length))
    spans.sort()
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:], strict=False))  # no overlaps
    assert spans[-1][1] == data.stat().st_size
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) < ec.EXTERNAL_MIN_BYTES for t in inline)

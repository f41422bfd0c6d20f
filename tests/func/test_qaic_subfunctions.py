"""``compile.qaic.use_onnx_subfunctions=true`` (issue 17, point 2): the decoder layers as one ONNX function.

A qaic build with the option, against the stand-in compiler, exports QEfficient's subfunction form (reference
3.3 and 3.6): every decoder layer is a call of one ``FunctionProto`` (the cache functions and CustomRMSNorm
called inside it), the invalid cache index is 0 instead of INT32_MAX, the layer function's retained-state
outputs are named ``*_InternalRetainedState`` while the graph's outputs keep the public ``*_RetainedState``
names (QEfficient's ``RenameFunctionOutputsTransform``), ``-sub-functions`` is passed, ``custom_io.yaml`` names
exactly the graph's KV inputs and outputs, and ONNX Runtime runs that graph to transformers' greedy tokens.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from qbuild.api import build
from qbuild.errors import ExportError
from tests.conftest import ROOT
from tests.func.test_kv_cache import PROMPTS, hf_greedy, kv_greedy, ort_step, tiny_model
from tests.func.test_qaic_graph import CTX, NEW_TOKENS, QAIC, RMS, hf_model, sdk  # noqa: F401  (sdk: fixture)

pytestmark = pytest.mark.slow
SUB = [*QAIC, "compile.qaic.use_onnx_subfunctions=true"]
LAYER_DOMAIN = "qbuild.transforms.kv_cache"
#: tiny manifest -> (layers, layer function, RMSNorms per layer inside it)
FAMILIES = {"tiny-llama-kv": (2, "KVLlamaDecoderLayer", 2), "tiny-gpt2": (2, "KVGPT2Block", 0),
            "tiny-gemma3": (3, "KVGemma3DecoderLayer", 6)}  # gemma3: sliding and full layers share it


def constants(nodes: Any) -> list[Any]:
    from onnx import numpy_helper

    return [numpy_helper.to_array(a.t) for n in nodes for a in n.attribute if a.HasField("t")]


def custom_io_names(path: Path) -> list[str]:
    return re.findall(r"^ - IOName: (\S+)$", path.read_text(), flags=re.M)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_subfunctions_export_one_layer_function_that_ort_runs_to_hf_tokens(name: str, sdk: Path,  # noqa: F811
                                                                           tmp_path: Path) -> None:
    import onnx

    layers, layer_fn, norms = FAMILIES[name]
    r = build(ROOT / "manifests" / f"{name}.yaml", SUB, cache_dir=tmp_path / "cache")
    onnx_path = Path(r.artifacts["onnx"])
    model = onnx.load(str(onnx_path), load_external_data=False)
    functions = {(f.domain, f.name): f for f in model.functions}
    assert set(functions) - {*CTX, RMS} == {(LAYER_DOMAIN, layer_fn)}  # one function for all the layers
    calls = Counter((n.domain, n.op_type) for n in model.graph.node)
    assert calls[(LAYER_DOMAIN, layer_fn)] == layers
    assert calls[CTX[0]] == calls[CTX[1]] == 0  # the cache is read and written inside the layer function
    body = functions[(LAYER_DOMAIN, layer_fn)]
    inside = Counter((n.domain, n.op_type) for n in body.node)
    assert inside[CTX[0]] == inside[CTX[1]] == 2 and inside[RMS] == norms
    assert not [op for (domain, op) in inside if op.startswith("Scatter")]
    assert {o.domain for o in body.opset_import} >= {"", CTX[0][0]}
    # QEfficient's subfunction conventions: invalid index 0, internal names on the function's outputs
    assert not any((v == 2**31 - 1).any() for v in constants([*model.graph.node, *body.node]) if v.dtype.kind == "i")
    retained = [o for o in body.output if o.endswith("RetainedState")]  # named after one of the calls
    assert [re.sub(r"\.\d+_", ".i_", o) for o in retained] == ["past_key.i_InternalRetainedState",
                                                               "past_value.i_InternalRetainedState"]
    cache = [f"past_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]
    inputs, outputs = [v.name for v in model.graph.input], [v.name for v in model.graph.output]
    assert inputs == ["input_ids", "position_ids", *cache]
    assert outputs == ["logits", *(f"{n}_RetainedState" for n in cache)]  # what -retained-state pairs

    compiled = Path(r.artifacts["compiled"])
    command = json.loads((compiled / "command.json").read_text())
    assert "-sub-functions" in command["argv"] and "-retained-state" in command["argv"]
    assert command["sub_functions"] is True
    names = custom_io_names(compiled / "custom_io.yaml")
    assert names == [n for c in cache for n in (c, f"{c}_RetainedState")]  # QEfficient's order, the graph's names
    assert set(names) <= {*inputs, *outputs}

    hf = hf_model(r.artifacts["model"])
    expected = [hf_greedy(copy.deepcopy(hf), p, NEW_TOKENS) for p in PROMPTS]
    c = hf.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    got, _logits = kv_greedy(ort_step(onnx_path), (layers, heads, head_dim), PROMPTS, NEW_TOKENS, chunk=8)
    assert got == expected


def test_the_subfunction_export_keeps_weight_names_and_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    """Same initializers as the export without functions; layer classes, hooks and the invalid index put back."""
    import onnx

    from qbuild.tasks.kv_causal_lm import export_kv_causal_lm
    from qbuild.transforms import apply_transforms
    from qbuild.transforms.kv_cache import KVLayerFunction

    model = apply_transforms_to_tiny(apply_transforms)
    classes = [type(layer) for layer in model.kv_layers()]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    plain = export_kv_causal_lm(model, tmp_path / "a", exporter="legacy", opset=17, graph="qaic")
    sub = export_kv_causal_lm(model, tmp_path / "b", exporter="legacy", opset=17, graph="qaic", sub_functions=True)
    assert sub["graph_form"]["sub_functions"] == ["KVLlamaDecoderLayer"] and sub["graph_form"]["invalid_index"] == 0
    assert sub["outputs"] == plain["outputs"]
    weights = [sorted((t.name if not t.name.startswith("onnx::") else "", *t.dims)  # transposed: numbered names
                      for t in onnx.load(str(tmp_path / d / "model.onnx"), load_external_data=False).graph.initializer
                      if t.dims) for d in ("a", "b")]
    assert weights[0] == weights[1]
    assert ("inner.model.embed_tokens.weight", 512, 64) in weights[1]
    assert [type(layer) for layer in model.kv_layers()] == classes
    assert not any(isinstance(layer, KVLayerFunction) for layer in model.kv_layers())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert model.kv_sub_functions is False and "kv_owner" not in model.kv_layers()[0].__dict__
    again = export_kv_causal_lm(model, tmp_path / "c", exporter="legacy", opset=17, graph="qaic")
    assert (tmp_path / "c" / "model.onnx").read_bytes() == (tmp_path / "a" / "model.onnx").read_bytes()
    assert again["graph_form"] == plain["graph_form"]


def apply_transforms_to_tiny(apply_transforms: Any) -> Any:
    model = tiny_model("llama")
    apply_transforms(model, ["kv_cache"])
    return model


def test_subfunctions_need_the_legacy_exporter(tmp_path: Path) -> None:
    from qbuild.tasks.kv_causal_lm import export_kv_causal_lm
    from qbuild.transforms import apply_transforms

    model = apply_transforms_to_tiny(apply_transforms)
    with pytest.raises(ExportError, match="use_onnx_subfunctions: .*legacy exporter"):
        export_kv_causal_lm(model, tmp_path, exporter="dynamo", opset=18, graph="qaic", sub_functions=True)

"""A qaic build exports QEfficient's graph form (issue 17), and ONNX Runtime still gives transformers' tokens.

For every tiny KV manifest (one per family qbuild rewrites), built with ``compile.backend=qaic`` against the
stand-in compiler: the cache is written and read only through ``com.qualcomm.cloud::CtxScatter`` /
``CtxGather`` functions (two of each per layer, the INT32_MAX invalid index in the graph), every RMSNorm of
the families QEfficient's CustomOpsTransform lists (reference 3.2, 5.3) is ``com.qti.aisw.onnx::CustomRMSNorm``,
the function bodies are standard ops, no ``-sub-functions`` is passed, and greedy decoding of that very
graph in ONNX Runtime (left padding, chunked prefill) equals HF ``generate`` on the built weights. The
onnxruntime build keeps the plain graph (another export key). Then bf16 on ai100 / ai200, the recorded
hardware, and ``use_onnx_subfunctions`` (its export: test_qaic_subfunctions.py).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from qbuild.api import build, plan
from tests.conftest import ROOT
from tests.func.test_kv_cache import PROMPTS, hf_greedy, kv_greedy, ort_step

pytestmark = pytest.mark.slow
FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-sdk"
QAIC = ["compile.backend=qaic"]
NEW_TOKENS = 12
CTX = ("com.qualcomm.cloud", "CtxScatter"), ("com.qualcomm.cloud", "CtxGather")
RMS = ("com.qti.aisw.onnx", "CustomRMSNorm")
#: tiny manifest -> (layers, RMSNorm modules): every family QEfficient swaps to CustomRMSNorm, and GPT-2
#: (LayerNorm only) for the cache functions alone
FAMILIES = {
    "tiny-llama-kv": (2, 2 * 2 + 1), "tiny-mistral": (2, 2 * 2 + 1), "tiny-qwen2": (2, 2 * 2 + 1),
    "tiny-qwen3": (2, 2 * 4 + 1),  # + q_norm / k_norm per layer
    "tiny-gemma3": (3, 3 * 6 + 1),  # 4 sandwich norms + q/k norms per layer
    "tiny-llama4": (4, 4 * 2 + 1),  # the qk L2 norm has no weight: not an RMSNorm
    "tiny-grok1": (2, 2 * 4 + 1), "tiny-gpt2": (2, 0),
}


@pytest.fixture
def sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the fake SDK (its qaic-util answer is remembered per path) as $QAIC_SDK_DIR."""
    root = tmp_path / "qti-aic"
    shutil.copytree(FAKE_SDK, root)
    monkeypatch.setenv("QAIC_SDK_DIR", str(root))
    monkeypatch.setenv("FAKE_QAIC_LOG", str(tmp_path / "calls.jsonl"))
    for var in ("FAKE_QAIC_MODE", "FAKE_QAIC_REJECT_NAMED", "FAKE_QAIC_VARIANT"):
        monkeypatch.delenv(var, raising=False)
    return root


def hf_model(directory: str) -> Any:
    """The built weights as transformers loads them (Grok-1: qbuild's own modelling code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if json.loads((Path(directory) / "config.json").read_text())["model_type"] == "grok-1":
        from qbuild.models.grok1 import register

        register()
    config = AutoConfig.from_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, config=config, attn_implementation="eager").eval()


def graph_ops(onnx_path: Path) -> tuple[Any, Counter[tuple[str, str]]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return model, Counter((n.domain or "", n.op_type) for n in model.graph.node)


def int32_max_in_graph(model: Any) -> bool:
    from onnx import numpy_helper

    values = [numpy_helper.to_array(a.t) for n in model.graph.node for a in n.attribute if a.HasField("t")]
    values += [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type in (6, 7) and len(t.dims) <= 1]
    return any((v == 2**31 - 1).any() for v in values if v.dtype.kind == "i")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_qaic_build_exports_ctx_functions_and_custom_rmsnorm_that_ort_runs_to_hf_tokens(
        name: str, sdk: Path, tmp_path: Path) -> None:
    layers, norms = FAMILIES[name]
    manifest = ROOT / "manifests" / f"{name}.yaml"
    r = build(manifest, QAIC, cache_dir=tmp_path / "cache")
    onnx_path = Path(r.artifacts["onnx"])
    model, ops = graph_ops(onnx_path)
    assert ops[CTX[0]] == ops[CTX[1]] == 2 * layers  # keys and values of every layer
    assert ops[RMS] == norms
    assert not [op for (domain, op) in ops if op.startswith("Scatter")]  # the cache is written by CtxScatter only
    functions = {(f.domain, f.name): f for f in model.functions}
    assert set(functions) == {*CTX, *([RMS] if norms else [])}
    assert all(n.domain == "" for f in functions.values() for n in f.node)  # standard-op bodies: ORT runs them
    assert [n.op_type for n in functions[CTX[0]].node][-1] == "ScatterND"
    assert [n.op_type for n in functions[CTX[1]].node][-1] == "GatherND"
    assert int32_max_in_graph(model)  # QEfficient's invalid index for slots past the last valid position
    compiled = Path(r.artifacts["compiled"])
    command = json.loads((compiled / "command.json").read_text())
    assert command["onnx_functions"] and "-sub-functions" not in command["argv"]  # as QEfficient's default graph
    assert "-retained-state" in command["argv"]

    hf = hf_model(r.artifacts["model"])
    expected = [hf_greedy(copy.deepcopy(hf), p, NEW_TOKENS) for p in PROMPTS]
    c = hf.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    got, _logits = kv_greedy(ort_step(onnx_path), (layers, heads, head_dim), PROMPTS, NEW_TOKENS, chunk=8)
    assert got == expected


def test_the_onnxruntime_build_keeps_the_plain_graph_under_another_export_key(sdk: Path, tmp_path: Path) -> None:
    manifest = ROOT / "manifests" / "tiny-llama-kv.yaml"
    cache = tmp_path / "cache"
    qaic = plan(manifest, QAIC, cache_dir=cache).stage("export")
    ort = plan(manifest, ["compile.backend=onnxruntime"], cache_dir=cache).stage("export")
    auto = plan(manifest, ["compile.backend=auto"], cache_dir=cache).stage("export")  # the fake SDK: auto -> qaic
    assert qaic.key != ort.key and auto.key == qaic.key
    r = build(manifest, ["compile.backend=onnxruntime", "verify.enabled=false"], cache_dir=cache)
    _model, ops = graph_ops(Path(r.artifacts["onnx"]))
    # no qaic custom op: by default ONNX Runtime's own GroupQueryAttention (one a layer, the cache written by it)
    assert not ops[("", "ScatterElements")] and {k: n for k, n in ops.items() if k[0]} == {
        ("com.microsoft", "GroupQueryAttention"): 2}
    r = build(manifest, ["compile.backend=onnxruntime", "compile.onnxruntime.attention=plain", "verify.enabled=false"],
              cache_dir=cache)
    _model, ops = graph_ops(Path(r.artifacts["onnx"]))
    # the plain cache writes, and ONNX Runtime's own RotaryEmbedding (2 layers x q, k)
    assert ops[("", "ScatterElements")] == 4 and {k: n for k, n in ops.items() if k[0]} == {
        ("com.microsoft", "RotaryEmbedding"): 4}


def _io_types(onnx_path: Path) -> dict[str, int]:
    model, _ops = graph_ops(onnx_path)
    return {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


def test_bf16_is_exported_in_float32_with_convert_to_fp16_on_ai100(sdk: Path, tmp_path: Path) -> None:
    from onnx import TensorProto

    manifest = ROOT / "manifests" / "tiny-llama-kv.yaml"
    r = build(manifest, [*QAIC, "model.dtype=bfloat16"], cache_dir=tmp_path / "cache")
    types = _io_types(Path(r.artifacts["onnx"]))
    assert types["past_key.0"] == types["logits"] == TensorProto.FLOAT
    compiled = Path(r.artifacts["compiled"])
    argv = json.loads((compiled / "command.json").read_text())["argv"]
    assert "-convert-to-fp16" in argv and "-custom-IO-list-file=<out>/custom_io.yaml" in argv
    assert (compiled / "custom_io.yaml").read_text().count("Precision: float16") == 8
    meta = json.loads((compiled.parent / "record.json").read_text())["meta"]
    assert meta["hardware"] == {"aic_hw_version": "ai100", "devices": {"0": "AIC100_ES"}, "targets": [0],
                                "why": f"detected by {sdk}/tools/qaic-util -q: QID 0 AIC100_ES"}
    artifact = json.loads((compiled / "artifact.json").read_text())
    assert artifact["options"]["hardware"]["devices"] == [[0, "AIC100_ES"]]


def test_bf16_stays_bf16_on_ai200(sdk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx import TensorProto

    monkeypatch.setenv("FAKE_QAIC_VARIANT", "aic200")  # detected case-insensitively
    manifest = ROOT / "manifests" / "tiny-llama-kv.yaml"
    r = build(manifest, [*QAIC, "model.dtype=bfloat16"], cache_dir=tmp_path / "cache")
    assert _io_types(Path(r.artifacts["onnx"]))["past_key.0"] == TensorProto.BFLOAT16
    compiled = Path(r.artifacts["compiled"])
    argv = json.loads((compiled / "command.json").read_text())["argv"]
    assert "-aic-hw-version=ai200" in argv and "-convert-to-fp16" not in argv
    assert not (compiled / "custom_io.yaml").exists()  # model and KV both bf16: no custom IO (QEfficient)


def test_use_onnx_subfunctions_passes_the_flag_and_keys_another_export(sdk: Path, tmp_path: Path) -> None:
    """The option in the command and the export key; the export itself: tests/func/test_qaic_subfunctions.py."""
    from qbuild.backends.qaic import QaicBackend
    from qbuild.manifest import compose
    from qbuild.store import Store
    from qbuild.tasks import task_for

    manifest = ROOT / "manifests" / "tiny-llama-kv.yaml"
    overrides = [*QAIC, "compile.qaic.use_onnx_subfunctions=true"]
    m = compose(manifest, overrides).manifest
    params = QaicBackend().resolve(m, task_for(m), Store(tmp_path / "cache", readonly=True).stats)
    assert "-sub-functions" in QaicBackend().describe(params)[1]
    p = plan(manifest, overrides, cache_dir=tmp_path / "cache")
    assert p.stage("export").key != plan(manifest, QAIC, cache_dir=tmp_path / "cache").stage("export").key

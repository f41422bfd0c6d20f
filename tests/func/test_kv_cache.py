"""The ``kv_cache`` transform on a tiny random Llama: greedy tokens equal HF ``generate``; the ONNX graph
(legacy and dynamo exporters, with and without ``custom_rmsnorm``) runs in ONNX Runtime with the same tokens
and logits within 1e-4 of the transformed PyTorch module.

The greedy loops below are test-local (the production runtime lives in qbuild/runtime): prompts are
left-padded with position -1, prefilled whole or in chunks, then decoded one token per step by feeding
position ids and the returned caches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

CONF = Path(__file__).resolve().parents[2] / "qbuild" / "conf" / "model"
PROMPTS = [[5, 17, 99, 3, 250, 7, 8, 9, 10, 11, 12, 40, 41], [300, 301, 7, 7, 9]]  # 13 and 5 tokens
NEW_TOKENS = 32  # as issue 3 asks: HF == transformed PyTorch == ONNX Runtime over 32 new tokens
CTX_LEN = 64
ATOL = 1e-4

Step = Callable[[Any, Any, list[Any]], tuple[Any, list[Any]]]


def tiny_model(family: str) -> Any:
    """The random-initialised model of ``qbuild/conf/model/tiny-<family>.yaml`` (eager attention)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = yaml.safe_load((CONF / f"tiny-{family}.yaml").read_text())
    if spec["architecture"] == "grok-1":
        from qbuild.models.grok1 import register

        register()  # transformers has no Grok-1: our own modelling code, registered by model_type
    config = AutoConfig.for_model(spec["architecture"], **spec["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.get("seed", 0))
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval().requires_grad_(False)


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """Hugging Face ``generate(do_sample=False)`` on one unpadded prompt, EOS disabled."""
    import torch

    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def torch_step(model: Any) -> Step:
    import torch

    def step(ids: Any, pos: Any, caches: list[Any]) -> tuple[Any, list[Any]]:
        with torch.no_grad():
            out = model(torch.from_numpy(ids), torch.from_numpy(pos), *(torch.from_numpy(c) for c in caches))
        return out[0].numpy(), [t.numpy() for t in out[1:]]

    return step


def ort_step(path: Path) -> Step:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def step(ids: Any, pos: Any, caches: list[Any]) -> tuple[Any, list[Any]]:
        out = session.run(None, dict(zip(names, [ids, pos, *caches], strict=True)))
        return out[0], out[1:]

    return step


def kv_greedy(step: Step, cache_shape: tuple[int, int, int], prompts: list[list[int]], n: int,
              chunk: int | None = None) -> tuple[list[list[int]], list[Any]]:
    """Left-padded batch prefill (whole or in ``chunk``-column pieces), then ``n - 1`` decode steps.

    Returns the new tokens per prompt and the logits ``[B,1,V]`` of every step.
    """
    import numpy as np

    layers, heads, head_dim = cache_shape
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    pos = np.full((len(prompts), width), -1, np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        pos[row, width - len(p):] = np.arange(len(p))
    caches = [np.zeros((len(prompts), heads, CTX_LEN, head_dim), np.float32) for _ in range(2 * layers)]
    steps = []
    for start in range(0, width, chunk or width):
        logits, caches = step(ids[:, start:start + (chunk or width)], pos[:, start:start + (chunk or width)], caches)
    steps.append(logits)
    tokens = logits[:, -1].argmax(-1)
    out, nxt = [tokens], np.array([len(p) for p in prompts], np.int64)
    for _ in range(n - 1):
        logits, caches = step(tokens[:, None].astype(np.int64), nxt[:, None], caches)
        steps.append(logits)
        tokens, nxt = logits[:, -1].argmax(-1), nxt + 1
        out.append(tokens)
    return np.stack(out, 1).tolist(), steps


def cache_shape(model: Any) -> tuple[int, int, int]:
    return (model.kv_num_layers(), *model.kv_cache_shape())


def check_family(family: str, tmp_path: Path, *, exporter: str = "legacy", opset: int = 17,
                 rmsnorm: bool = False) -> dict[str, Any]:
    """HF == transformed PyTorch (whole and chunked prefill) == ONNX Runtime; logits within ATOL."""
    import numpy as np

    from qbuild.tasks.kv_causal_lm import export_kv_causal_lm
    from qbuild.transforms import apply_transforms

    model = tiny_model(family)
    reference = copy.deepcopy(model)
    expected = [hf_greedy(reference, p, NEW_TOKENS) for p in PROMPTS]
    reports = apply_transforms(model, [*(["custom_rmsnorm"] if rmsnorm else []), "kv_cache"])
    shape = cache_shape(model)
    tokens, pt_logits = kv_greedy(torch_step(model), shape, PROMPTS, NEW_TOKENS)
    assert tokens == expected
    chunked, _ = kv_greedy(torch_step(model), shape, PROMPTS, NEW_TOKENS, chunk=8)
    assert chunked == expected
    info = export_kv_causal_lm(model, tmp_path, exporter=exporter, opset=opset)
    ort_tokens, ort_logits = kv_greedy(ort_step(tmp_path / info["onnx"]), shape, PROMPTS, NEW_TOKENS, chunk=8)
    assert ort_tokens == expected
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ort_logits, pt_logits, strict=True))
    assert diff < ATOL, diff
    return {"info": info, "reports": reports, "diff": diff}


# ------------------------------------------------------------------------------------------ tests
def test_llama_legacy(tmp_path: Path) -> None:
    result = check_family("llama", tmp_path)
    info = result["info"]
    assert info["inputs"][:4] == ["input_ids", "position_ids", "past_key.0", "past_value.0"]
    assert info["outputs"][:3] == ["logits", "past_key.0_RetainedState", "past_value.0_RetainedState"]
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"], info["vocab_size"]) == (2, 2, 16, 512)
    assert result["reports"][-1]["name"] == "kv_cache" and result["reports"][-1]["num_layers"] == 2


def test_graph_contract(tmp_path: Path) -> None:
    """Names, dtypes and symbolic dims exactly as the runtime and qaic backend expect; standard ops only."""
    import onnx

    from qbuild.tasks.kv_causal_lm import export_kv_causal_lm
    from qbuild.transforms import apply_transforms

    model = tiny_model("llama")
    apply_transforms(model, ["kv_cache"])
    export_kv_causal_lm(model, tmp_path, exporter="legacy", opset=17)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph

    def sig(values: Any) -> list[tuple[str, int, list[Any]]]:
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    i64, f32, kv = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT, ["batch_size", 2, "ctx_len", 16]
    assert sig(graph.input) == [("input_ids", i64, ["batch_size", "seq_len"]),
                                ("position_ids", i64, ["batch_size", "seq_len"]),
                                *((f"past_{k}.{i}", f32, kv) for i in range(2) for k in ("key", "value"))]
    retained = [(f"past_{k}.{i}_RetainedState", f32, kv) for i in range(2) for k in ("key", "value")]
    assert sig(graph.output) == [("logits", f32, ["batch_size", 1, 512]), *retained]
    # standard ops, and ONNX Runtime's own RotaryEmbedding: this graph is the onnxruntime backend's (the qaic and
    # QNN backends export the qaic form, tests/func/test_qaic_graph.py)
    assert {(n.domain, n.op_type) for n in graph.node if n.domain not in ("", "ai.onnx")} == {
        ("com.microsoft", "RotaryEmbedding")}


def test_llama_dynamo_custom_rmsnorm(tmp_path: Path) -> None:
    import onnx

    result = check_family("llama", tmp_path, exporter="dynamo", opset=18, rmsnorm=True)
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert [(f.domain, f.name) for f in model.functions] == [("com.qti.aisw.onnx", "CustomRMSNorm")]
    assert sum(n.op_type == "CustomRMSNorm" for n in model.graph.node) == 5  # 2 per layer + final
    assert result["reports"][0]["swapped"] == {"LlamaRMSNorm": 5}


def test_legacy_custom_rmsnorm_function_body(tmp_path: Path) -> None:
    import onnx

    check_family("llama", tmp_path, rmsnorm=True)
    model = onnx.load(str(tmp_path / "model.onnx"))
    (fn,) = model.functions
    assert (fn.domain, fn.name, list(fn.attribute)) == ("com.qti.aisw.onnx", "CustomRMSNorm", ["epsilon"])
    assert {n.domain for n in fn.node} == {""}  # a standard-op body: ONNX Runtime runs it
    assert any(o.domain == "com.qti.aisw.onnx" for o in model.opset_import)


def test_padding_writes_nothing_visible() -> None:
    """A padded prompt gives the same logits and the same valid cache slots as the unpadded one."""
    import numpy as np

    from qbuild.transforms import apply_transforms

    model = tiny_model("llama")
    apply_transforms(model, ["kv_cache"])
    step, shape = torch_step(model), cache_shape(model)
    caches = [np.zeros((1, shape[1], CTX_LEN, shape[2]), np.float32) for _ in range(2 * shape[0])]
    ids = np.array([[0, 0, 5, 6, 7]], np.int64)
    plain = step(ids[:, 2:], np.array([[0, 1, 2]], np.int64), caches)
    right = step(np.array([[5, 6, 7, 0, 0]], np.int64), np.array([[0, 1, 2, -1, -1]], np.int64), caches)
    left = step(ids, np.array([[-1, -1, 0, 1, 2]], np.int64), caches)
    for logits, new in (right, left):
        np.testing.assert_allclose(logits, plain[0], atol=1e-6)
        for got, want in zip(new, plain[1], strict=True):
            np.testing.assert_allclose(got[:, :, :3], want[:, :, :3], atol=1e-6)
            assert not got[:, :, 3:].any()  # padding wrote nothing beyond the valid slots


def test_kv_cache_rejects_unknown_family_and_double_apply() -> None:
    from qbuild.errors import TransformError
    from qbuild.transforms import apply_transforms

    model = tiny_model("llama")
    apply_transforms(model, ["kv_cache"])
    with pytest.raises(TransformError, match="already applied"):
        apply_transforms(model, ["kv_cache"])
    other = tiny_model("llama")
    other.config.model_type = "unknown-arch"
    with pytest.raises(TransformError, match="no kv_cache rewrite for model_type 'unknown-arch'; supported: .*llama"):
        apply_transforms(other, ["kv_cache"])

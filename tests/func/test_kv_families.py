"""The ``kv_cache`` family rewrites, each on its tiny random config (qbuild/conf/model/tiny-<family>.yaml):
HF ``generate`` tokens == transformed PyTorch tokens (batch of 2 prompts of different lengths, left padding
with position -1, whole and 8-token chunked prefill) == ONNX Runtime tokens, with ONNX Runtime logits
within 1e-4 of PyTorch at every step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.func.test_kv_cache import check_family, tiny_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gpt2", "gemma3"])
def test_family_legacy(family: str, tmp_path: Path) -> None:
    result = check_family(family, tmp_path)
    assert result["info"]["exporter"] == "legacy"


def test_gemma3_custom_rmsnorm(tmp_path: Path) -> None:
    """Gemma norms scale by 1 + w: the custom op gets w + 1 and still matches HF."""
    result = check_family("gemma3", tmp_path, rmsnorm=True)
    swapped = result["reports"][0]["swapped"]
    assert swapped == {"Gemma3RMSNorm": 3 * 4 + 3 * 2 + 1}  # 4 per layer, q/k norms, final


def test_llama4_dynamo(tmp_path: Path) -> None:
    """MoE, chunked attention, a NoPE layer; real-valued RoPE makes the dynamo export possible."""
    result = check_family("llama4", tmp_path, exporter="dynamo", opset=18)
    report = result["reports"][-1]
    assert report["moe_layers"] == [1, 3] and report["attention_chunk_size"] == 8
    assert report["layer_types"][-1] == "full_attention"  # the NoPE layer


def test_grok1_legacy(tmp_path: Path) -> None:
    """Softcap 30, sandwich norms, MoE top-2 without renormalisation; the reference is our eager Grok-1."""
    result = check_family("grok1", tmp_path)
    assert result["reports"][-1]["family"] == "grok1"


def test_llama_swiftkv_legacy(tmp_path: Path) -> None:
    """SwiftKV: later layers' caches from norm_swiftkv after layer 1, later layers for the last token only; the
    reference is our eager SwiftKV model's generate."""
    from qbuild.models.llama_swiftkv import register

    register()  # transformers has no SwiftKV: our own modelling code, registered by model_type
    result = check_family("llama-swiftkv", tmp_path)
    assert result["reports"][-1]["family"] == "llama_swiftkv" and result["info"]["num_layers"] == 4
    assert result["reports"][-1]["num_key_value_layers"] == 2


def test_family_features_are_exercised() -> None:
    """The tiny configs keep what makes each family distinct (else the tests above prove less)."""
    mistral, qwen2, gemma3 = tiny_model("mistral"), tiny_model("qwen2"), tiny_model("gemma3")
    assert mistral.config.sliding_window == 8
    assert qwen2.config.layer_types == ["full_attention", "sliding_attention"]
    assert gemma3.config.attn_logit_softcapping and gemma3.config.final_logit_softcapping
    assert {"sliding_attention", "full_attention"} == set(gemma3.config.layer_types)
    llama4 = tiny_model("llama4").config
    assert llama4.moe_layers and 0 in llama4.no_rope_layers and llama4.attention_chunk_size < 13

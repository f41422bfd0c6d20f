"""Settings a build does not use are named by plan, never dropped silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbuild.api import plan
from tests.conftest import ROOT, TINY


def test_the_other_backends_settings_are_noted(tmp_path: Path) -> None:
    p = plan(TINY, ["compile.qaic.num_cores=4", "compile.qaic.mxfp6_matmul=true"], cache_dir=tmp_path)
    assert "compile.qaic.num_cores: 4 is not used: the compile backend is onnxruntime" in p.notes
    assert "compile.qaic.mxfp6_matmul: true is not used: the compile backend is onnxruntime" in p.notes
    quiet = plan(TINY, [], cache_dir=tmp_path)
    assert not [n for n in quiet.notes if "is not used" in n]  # defaults are not news


def test_mxint8_kv_cache_without_a_kv_cache_is_noted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.func.test_qaic_backend import FAKE_SDK

    monkeypatch.setenv("QAIC_SDK_DIR", str(FAKE_SDK))  # the stand-in SDK: plan needs a compiler to exist
    p = plan(TINY, ["compile=qaic", "compile.qaic.mxint8_kv_cache=true", "compile.onnxruntime.threads=1"],
             cache_dir=tmp_path)
    assert any(n.startswith("compile.qaic.mxint8_kv_cache: not used: this model has no KV cache") for n in p.notes)
    assert "compile.onnxruntime.threads: 1 is not used: the compile backend is qaic" in p.notes
    kv = plan(ROOT / "manifests" / "tiny-llama-kv.yaml", ["compile=qaic", "compile.qaic.mxint8_kv_cache=true"],
              cache_dir=tmp_path)
    assert not [n for n in kv.notes if "mxint8_kv_cache" in n]


def test_auto_does_not_bet_a_build_on_a_compiler_no_sdk_vouches_for(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.func.test_qaic_backend import FAKE_SDK

    p = plan(TINY, ["compile=auto", "compile.qaic.compiler=/bin/false"], cache_dir=tmp_path)
    assert p.stage("compile").stage.backend.name == "onnxruntime"
    assert p.notes[0].startswith("compile.backend: auto -> onnxruntime (/bin/false has no Cloud AI 100 SDK")
    monkeypatch.setenv("QAIC_SDK_DIR", str(FAKE_SDK))  # an installation with its version files: auto takes it
    assert plan(TINY, ["compile=auto"], cache_dir=tmp_path).stage("compile").stage.backend.name == "qaic"


def test_vlm_settings_of_a_text_only_model_are_noted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vlm.* shapes image-text-to-text builds only; a VLM's mxint8 KV cache is used (its language program's)."""
    p = plan(TINY, ["vlm.max_num_tiles=5", "vlm.vision_batch_size=2"], cache_dir=tmp_path)
    assert "vlm.max_num_tiles: 5 is not used: model.task is causal_lm, not image-text-to-text" in p.notes
    assert "vlm.vision_batch_size: 2 is not used: model.task is causal_lm, not image-text-to-text" in p.notes
    from tests.func.test_qaic_backend import FAKE_SDK

    monkeypatch.setenv("QAIC_SDK_DIR", str(FAKE_SDK))
    vlm = plan(ROOT / "manifests" / "tiny-llama4-vlm.yaml", ["compile=qaic", "compile.qaic.mxint8_kv_cache=true"],
               cache_dir=tmp_path)
    assert not [n for n in vlm.notes if "mxint8_kv_cache" in n or n.startswith("vlm.")]


def test_max_num_tiles_of_a_model_that_does_not_tile_is_noted(tmp_path: Path) -> None:
    gemma = plan(ROOT / "manifests" / "tiny-gemma3-vlm.yaml", ["vlm.max_num_tiles=5"], cache_dir=tmp_path)
    assert "vlm.max_num_tiles: 5 is not used: gemma3 does not tile its images (only Llama 4 does)" in gemma.notes
    llama4 = plan(ROOT / "manifests" / "tiny-llama4-vlm.yaml", ["vlm.max_num_tiles=3"], cache_dir=tmp_path)
    assert not [n for n in llama4.notes if n.startswith("vlm.max_num_tiles")]


def test_model_lora_without_a_random_adapter_is_noted(tmp_path: Path) -> None:
    kv = ROOT / "manifests" / "tiny-llama-kv.yaml"
    p = plan(kv, ["model.lora.r=4"], cache_dir=tmp_path)
    assert "model.lora.r: 4 is not used: model.adapters is empty" in p.notes
    random = plan(ROOT / "manifests" / "tiny-llama-multilora.yaml", ["model.lora.r=4"], cache_dir=tmp_path)
    assert not [n for n in random.notes if n.startswith("model.lora.")]  # its random adapters take r

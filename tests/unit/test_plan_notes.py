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

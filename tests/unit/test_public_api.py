"""The public API: qbuild's __all__ pinned, typed, documented, light to import; QEFF keyword arguments
checked by name before anything is built (no torch here)."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qbuild
from qbuild import ApiManifest, ManifestError, QBuildError, QEFFAutoModel, QEFFAutoModelForCausalLM
from qbuild.manifest import compose

ROOT = Path(__file__).resolve().parents[2]

PUBLIC = [
    "ApiManifest", "BuildResult", "CacheError", "CompileError", "CompiledModel", "ExecInfo", "ExportError",
    "ManifestError", "PlanError", "QBuildError", "QEFFAutoModel", "QEFFAutoModelForCausalLM",
    "QEFFTransformersBase", "RunError", "RunResult", "StageError", "TransformError", "VerifyError",
    "__version__", "build", "embed", "load", "plan", "run", "transform_lm",
]


def test_all_is_pinned_sorted_and_importable() -> None:
    assert qbuild.__all__ == PUBLIC
    assert qbuild.__all__ == sorted(qbuild.__all__)
    for name in qbuild.__all__:
        assert getattr(qbuild, name) is not None
    import qbuild.qeff as qeff

    assert qeff.__all__ == sorted(qeff.__all__)
    assert qeff.QEFFAutoModel is qbuild.QEFFAutoModel and qeff.transform_lm is qbuild.transform_lm
    assert issubclass(QEFFAutoModel, qbuild.QEFFTransformersBase)
    assert issubclass(QEFFAutoModelForCausalLM, qbuild.QEFFTransformersBase)


def test_functions_are_typed_and_documented() -> None:
    for name in ("build", "plan", "run", "embed", "load", "transform_lm"):
        fn = getattr(qbuild, name)
        sig = inspect.signature(fn)
        assert fn.__doc__ and fn.__doc__.strip(), name
        assert sig.return_annotation is not inspect.Signature.empty, name
        for p in sig.parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name})"
    for cls in (QEFFAutoModel, QEFFAutoModelForCausalLM):
        for meth in ("from_pretrained", "export", "compile", "generate"):
            fn = getattr(cls, meth)
            assert fn.__doc__ and inspect.signature(fn).return_annotation is not inspect.Signature.empty


def test_py_typed_is_shipped() -> None:
    assert (ROOT / "qbuild" / "py.typed").is_file()
    data = (ROOT / "pyproject.toml").read_text()
    package_data = re.search(r"\[tool\.setuptools\.package-data\]\s*\nqbuild = (\[.*\])", data)
    assert package_data and "py.typed" in json.loads(package_data.group(1))


def test_import_is_light() -> None:
    heavy = ("torch", "transformers", "onnx", "onnxruntime")
    code = f"import json, sys, qbuild; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == []


# --- keyword arguments ----------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A directory with a config.json: enough to compose (nothing is loaded in these tests)."""
    d = tmp_path / "tiny-bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                               "num_attention_heads": 4, "intermediate_size": 64,
                                               "vocab_size": 100, "max_position_embeddings": 512}))
    return d


def _raises(match: str, fn, *args, **kwargs) -> ManifestError:  # noqa: ANN001
    with pytest.raises(ManifestError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, QBuildError)
    return info.value


def test_unknown_and_unsupported_keywords_are_named(model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    e = _raises("unknown keyword argument 'poolin'; did you mean 'pooling'", QEFFAutoModel.from_pretrained,
                model_dir, poolin="mean", qbuild_cache_dir=cache)
    assert e.key == "poolin"
    _raises("continuous_batching=True is not supported by qbuild yet", QEFFAutoModelForCausalLM.from_pretrained,
            model_dir, continuous_batching=True, qbuild_cache_dir=cache)
    _raises("dtype 'float64'", QEFFAutoModel.from_pretrained, model_dir, torch_dtype="float64", qbuild_cache_dir=cache)
    _raises("pooling must be", QEFFAutoModel.from_pretrained, model_dir, pooling=3, qbuild_cache_dir=cache)
    _raises("pooling: unknown|pooling.method|pooling", QEFFAutoModel.from_pretrained, model_dir, pooling="meen",
            qbuild_cache_dir=cache)

    _raises("unknown keyword argument 'continuous_batching'", QEFFAutoModel.from_pretrained, model_dir,
            continuous_batching=False, qbuild_cache_dir=cache)  # QEfficient's encoders have no such option
    model = QEFFAutoModel.from_pretrained(model_dir, qbuild_cache_dir=cache)
    _raises("unknown keyword argument 'num_core'; did you mean 'num_cores'", model.compile, num_core=16)
    _raises("num_cores must be an int, got '16'", model.compile, num_cores="16")
    e = _raises("^num_cores: compile.qaic.num_cores", model.compile, num_cores=0)  # the schema's range, by name
    assert e.key == "num_cores"
    _raises("mxint8_kv_cache", model.compile, mxint8_kv_cache=True)  # an encoder has no KV cache
    _raises("backend='gpu'; choose qaic, onnxruntime, qnn or auto", model.compile, backend="gpu")
    _raises("compile_dir=", model.compile, compile_dir="/tmp/x")
    _raises("seq_len must be an int or a list of ints", model.compile, seq_len=[32, "64"])
    _raises("onnxruntime.*thread", model.compile, onnxruntime={"thread": 1})
    _raises("ols is a qaic-exec setting the QNN path does not take", model.compile, enable_qnn=True, ols=2)
    _raises("enable_qnn=True compiles with QNN, but backend='qaic'", model.compile, enable_qnn=True, backend="qaic")
    _raises("qnn_config is for the QNN path", model.compile, qnn_config="q.json")
    # QEfficient's QNN and subfunction keywords land on the manifest keys the backends read
    assert model._qaic_settings("t", {"enable_qnn": True, "num_cores": 8, "qnn_config": "q.json"}) == {
        "compile.backend": "qnn", "compile.qnn.num_cores": 8, "compile.qnn.config": "q.json"}
    assert model._qaic_settings("t", {"use_onnx_subfunctions": True}) == {
        "compile.backend": "auto", "compile.qaic.use_onnx_subfunctions": True}

    llama = tmp_path / "tiny-llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 300, "max_position_embeddings": 256}))
    _raises("kv_cache has no rewrite for model type 'bert'", QEFFAutoModelForCausalLM.from_pretrained, model_dir,
            qbuild_cache_dir=cache)
    lm = QEFFAutoModelForCausalLM.from_pretrained(llama, qbuild_cache_dir=cache, continuous_batching=False)
    _raises("full_batch_size=4 is not supported by qbuild yet", lm.compile, full_batch_size=4)
    _raises("num_speculative_tokens=2 is not supported", lm.compile, num_speculative_tokens=2)
    _raises("unknown keyword argument 'seq_len'", lm.compile, seq_len=32)
    _raises("device selection", lm.generate, None, ["hi"], device_id=[0])


def test_manifest_yaml_composes_to_the_same_manifest(model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    model = QEFFAutoModel.from_pretrained(model_dir, pooling="cls", normalize=True, qbuild_cache_dir=cache)
    model._set_compile({"seq.lengths": [16, 256], "seq.batch_size": 2, "seq.ctx_len": 256,
                        "compile.qaic.num_cores": 8, "compile.backend": "onnxruntime"})
    saved = model.manifest.save(tmp_path / "elsewhere" / "m.yaml")
    from_file = compose(saved).manifest
    assert from_file == model.manifest.compose(cache).manifest
    assert from_file.model.path == str(model_dir.resolve()) and from_file.model.task == "embedding"
    assert (from_file.pooling.method, from_file.pooling.normalize) == ("cls", True)
    assert (from_file.seq.lengths, from_file.seq.batch_size, from_file.compile.qaic.num_cores) == ([16, 256], 2, 8)
    assert isinstance(model.manifest, ApiManifest) and model.manifest == model.manifest
    assert "lengths: [16, 256]" in model.manifest.to_yaml()

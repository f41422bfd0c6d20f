"""End to end on a tiny random llama: init, load, export, compile with ONNX Runtime, verify."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from qbuild.errors import CompileError, ExportError, LoadError, ManifestError, VerifyError

pytestmark = pytest.mark.slow

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}
VOCAB = TINY_LLAMA["vocab_size"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny random llama saved to disk, loaded, legacy-exported and compiled (shared, read-only)."""
    from qbuild.backends.onnxruntime import compile_onnx
    from qbuild.models.source import init_random, load_model
    from qbuild.tasks.causal_lm import export_causal_lm

    root = tmp_path_factory.mktemp("tiny")
    init = init_random("llama", TINY_LLAMA, 0, "float32", root / "model")
    model = load_model(root / "model", "causal_lm", "float32")
    export = export_causal_lm(model, root / "export", exporter="legacy", opset=17)
    compiled = compile_onnx(
        root / "export" / "model.onnx", root / "compiled", num_cores=2, graph_optimization="extended"
    )
    return {"root": root, "init": init, "model": model, "export": export, "compiled": compiled}


def _padded_inputs(lengths: list[int], seq_len: int, seed: int):
    import numpy as np

    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, size=(len(lengths), seq_len)).astype(np.int64)
    mask = (np.arange(seq_len)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return ids, mask


def test_modules_import_without_heavy_packages() -> None:
    code = (
        "import sys\n"
        "import qbuild.models.source, qbuild.transforms, qbuild.tasks.causal_lm\n"
        "import qbuild.backends.onnxruntime, qbuild.tasks.causal_lm\n"
        "from qbuild.transforms import known_transforms, transform_versions\n"
        "known_transforms(); transform_versions([])\n"
        "heavy = {'torch', 'transformers', 'onnx', 'onnxruntime', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_init_random_writes_safetensors(tiny: dict) -> None:
    init = tiny["init"]
    assert init["model_type"] == "llama"
    assert {"config.json", "model.safetensors"} <= set(init["files"])
    assert 100_000 < init["num_parameters"] < 200_000
    json.dumps(init)


def test_init_random_is_seeded(tmp_path: Path) -> None:
    from qbuild.models.source import init_random

    small = {**TINY_LLAMA, "num_hidden_layers": 1}
    blobs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        init_random("llama", small, seed, "float32", tmp_path / name)
        blobs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert blobs[0] == blobs[1]
    assert blobs[0] != blobs[2]


def test_loaded_model_is_eval_without_grad(tiny: dict) -> None:
    model = tiny["model"]
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "eager"


def test_load_model_names_missing_config(tmp_path: Path) -> None:
    from qbuild.models.source import load_model

    with pytest.raises(LoadError, match="config.json") as err:
        load_model(tmp_path, "causal_lm", "float32")
    assert str(tmp_path) in str(err.value)


def test_unknown_architecture_suggests_close_match(tmp_path: Path) -> None:
    from qbuild.models.source import init_random

    with pytest.raises(LoadError) as err:
        init_random("lama", {}, 0, "float32", tmp_path)
    text = str(err.value)
    assert "model.architecture" in text and "'lama'" in text and "llama" in err.value.hint


def test_export_report(tiny: dict) -> None:
    export = tiny["export"]
    assert export["onnx"] == "model.onnx" and "model.onnx" in export["files"]
    assert export["inputs"] == ["input_ids", "attention_mask"]
    assert export["outputs"] == ["logits"]
    assert (export["exporter"], export["opset"]) == ("legacy", 17)


def test_compile_writes_session_json(tiny: dict) -> None:
    compiled, out = tiny["compiled"], tiny["root"] / "compiled"
    assert {"model.onnx", "session.json"} <= set(compiled["files"])
    meta = json.loads((out / "session.json").read_text())
    assert meta["intra_op_num_threads"] == 2 and meta["inter_op_num_threads"] == 1
    assert meta["graph_optimization"] == "extended"
    assert meta["providers"] == ["CPUExecutionProvider"]
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"]
    assert meta["outputs"][0]["shape"] == ["batch", "seq", str(VOCAB)]


def test_verify_passes(tiny: dict) -> None:
    from qbuild.runtime.onnxruntime import open_session
    from qbuild.tasks.causal_lm import verify_causal_lm

    session = open_session(tiny["root"] / "compiled")
    report = verify_causal_lm(tiny["model"], session, batch_size=4, seq_len=16, seed=0, atol=ATOL, vocab_size=VOCAB)
    assert report["max_abs_diff"] <= ATOL
    assert report["positions_compared"] == 16 + 14 + 12 + 10
    assert report["argmax_agreement"] == 1.0


def test_ort_matches_torch_other_shape(tiny: dict) -> None:
    """Independent of verify_causal_lm: batch 3, length 11, right padding."""
    import numpy as np
    import torch

    from qbuild.runtime.onnxruntime import open_session

    ids, mask = _padded_inputs([11, 7, 1], 11, seed=5)
    session = open_session(tiny["root"] / "compiled", num_threads=1)
    (got,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        ref = tiny["model"](
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False
        ).logits.numpy()
    assert got.shape == (3, 11, VOCAB)
    assert np.abs(got - ref)[mask.astype(bool)].max() < ATOL


def test_tampered_reference_fails_verify(tiny: dict) -> None:
    import torch

    from qbuild.models.source import load_model
    from qbuild.runtime.onnxruntime import open_session
    from qbuild.tasks.causal_lm import verify_causal_lm

    model = load_model(tiny["root"] / "model", "causal_lm", "float32")  # a private copy to tamper with
    with torch.no_grad():
        model.lm_head.weight[7, 3] += 1e-2
    session = open_session(tiny["root"] / "compiled")
    with pytest.raises(VerifyError, match=r"max abs diff .* > atol 0\.0001 at batch row \d+, position \d+"):
        verify_causal_lm(model, session, batch_size=2, seq_len=16, seed=0, atol=ATOL, vocab_size=VOCAB)


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="dynamo export needs onnxscript")
def test_dynamo_export_compiles_and_verifies(tiny: dict) -> None:
    from qbuild.backends.onnxruntime import compile_onnx
    from qbuild.runtime.onnxruntime import open_session
    from qbuild.tasks.causal_lm import export_causal_lm, verify_causal_lm

    root = tiny["root"]
    export = export_causal_lm(tiny["model"], root / "dynamo", exporter="dynamo", opset=18)
    assert {"model.onnx", "model.onnx.data"} <= set(export["files"])
    compile_onnx(root / "dynamo" / "model.onnx", root / "dynamo_ort", num_cores=2, graph_optimization="all")
    session = open_session(root / "dynamo_ort")
    assert [i.shape for i in session.get_inputs()] == [["batch", "seq"], ["batch", "seq"]]
    report = verify_causal_lm(tiny["model"], session, batch_size=3, seq_len=12, seed=1, atol=ATOL, vocab_size=VOCAB)
    assert report["max_abs_diff"] <= ATOL


def test_dynamo_refuses_low_opset(tiny: dict, tmp_path: Path) -> None:
    from qbuild.tasks.causal_lm import export_causal_lm

    with pytest.raises(ExportError, match="opset >= 18"):
        export_causal_lm(tiny["model"], tmp_path, exporter="dynamo", opset=17)


def test_export_failure_is_one_line_with_cause(tmp_path: Path) -> None:
    import torch

    from qbuild.tasks.causal_lm import export_causal_lm

    class Broken(torch.nn.Module):
        config = types.SimpleNamespace(vocab_size=16)

        def forward(self, input_ids, attention_mask, use_cache=False):
            raise RuntimeError("boom\nsecond line")

    with pytest.raises(ExportError) as err:
        export_causal_lm(Broken(), tmp_path, exporter="legacy", opset=17)
    assert "boom" in err.value.message and "\n" not in err.value.message
    assert isinstance(err.value.__cause__, RuntimeError)


def test_compile_error_names_file(tmp_path: Path) -> None:
    from qbuild.backends.onnxruntime import compile_onnx

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(CompileError, match="bad.onnx"):
        compile_onnx(bad, tmp_path / "out", num_cores=1, graph_optimization="basic")


def test_unknown_transform_lists_known_names(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import qbuild.transforms as transforms

    monkeypatch.setitem(transforms._REGISTRY, "noop", ("qbuild_test_plugin:noop", 1))
    with pytest.raises(ManifestError) as err:
        transforms.apply_transforms(tiny["model"], ["kv_cahce"])
    assert err.value.key == "transforms.apply"
    assert "'kv_cahce'" in str(err.value) and "noop" in str(err.value)
    with pytest.raises(ManifestError):
        transforms.transform_versions(["kv_cahce"])


def test_registry_and_entry_point_transforms(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import qbuild.transforms as transforms

    plugin = types.ModuleType("qbuild_test_plugin")
    plugin.noop = lambda model: {"changed": 0}

    def tagged(model):
        return {"changed": 1}

    tagged.version = 4
    plugin.tagged = tagged
    monkeypatch.setitem(sys.modules, "qbuild_test_plugin", plugin)
    monkeypatch.setitem(transforms._REGISTRY, "noop", ("qbuild_test_plugin:noop", 2))
    ep = EntryPoint(name="tagged", value="qbuild_test_plugin:tagged", group=transforms.ENTRY_POINT_GROUP)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: [ep] if group else [])

    assert transforms.known_transforms() == ["custom_rmsnorm", "kv_cache", "noop", "tagged"]
    assert transforms.transform_versions(["noop", "tagged"]) == {"noop": 2, "tagged": 4}
    # a plugin's code lies outside qbuild's recipe files: its source file is keyed instead
    import hashlib
    import inspect

    source = Path(inspect.getsourcefile(tagged))
    assert transforms.transform_sources(["noop", "tagged", "kv_cache"]) == {
        "tagged": hashlib.sha256(source.read_bytes()).hexdigest()}
    reports = transforms.apply_transforms(tiny["model"], ["noop", "tagged"])
    assert reports == [
        {"name": "noop", "version": 2, "changed": 0},
        {"name": "tagged", "version": 4, "changed": 1},
    ]
    assert transforms.apply_transforms(tiny["model"], []) == []


def test_load_model_refuses_missing_weights(tmp_path: Path) -> None:
    """A base model (no LM head) loaded as causal_lm must fail, not get a random head."""
    from qbuild.models.source import init_random, load_model

    init_random("llama", {**TINY_LLAMA, "num_hidden_layers": 1}, 0, "float32", tmp_path, task="embedding")
    assert type(load_model(tmp_path, "embedding", "float32")).__name__ == "LlamaModel"
    with pytest.raises(LoadError, match="lm_head.weight"):
        load_model(tmp_path, "causal_lm", "float32")


def test_per_tensor_external_data_is_gathered(tiny: dict, tmp_path: Path) -> None:
    """The legacy exporter writes one file per tensor above 2 GiB; export folds them into one."""
    import onnx

    from qbuild.backends.onnxruntime import compile_onnx
    from qbuild.runtime.onnxruntime import open_session
    from qbuild.tasks.causal_lm import verify_causal_lm
    from qbuild.tasks.export_common import gather_external_data

    proto = onnx.load(str(tiny["root"] / "export" / "model.onnx"))
    onnx.save_model(
        proto,
        str(tmp_path / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=1024,
    )
    extra = {p.name for p in tmp_path.iterdir()} - {"model.onnx"}
    assert len(extra) > 3
    gather_external_data(tmp_path / "model.onnx", extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    compile_onnx(tmp_path / "model.onnx", tmp_path / "ort", num_cores=1, graph_optimization="basic")
    report = verify_causal_lm(
        tiny["model"], open_session(tmp_path / "ort"), batch_size=2, seq_len=8, seed=0, atol=ATOL, vocab_size=VOCAB
    )
    assert report["max_abs_diff"] <= ATOL

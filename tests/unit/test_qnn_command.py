"""The QNN commands and config files against hand-written golden files; qnn_config, manifest checks, discovery.

Pure functions only (no torch, no SDK): each case shows its whole input, the expected output is in
tests/golden/qnn/<case>/ (typed from the reference, see its README).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qbuild.backends import qnn_command, qnn_sdk
from qbuild.backends.qnn import custom_io
from qbuild.backends.qnn_command import Tensor
from qbuild.backends.qnn_sdk import QnnSdk
from qbuild.errors import CompileError, ManifestError
from qbuild.manifest.validate import to_manifest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "qnn"
FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-qnn-sdk"
SDK = QnnSdk("/opt/qnn", "2.31.0.250130")
# a 2-layer retained-state KV graph (2 KV heads, head dim 16), as the causal-LM KV export names and shapes it
KV = [(name, "float32", ("batch_size", 2, "ctx_len", 16)) for name in ("past_key", "past_value")]
KV_INPUTS = [Tensor("input_ids", "int64", ("batch_size", "seq_len")),
             Tensor("position_ids", "int64", ("batch_size", "seq_len")),
             *[Tensor(f"{n}.{i}", t, d) for i in range(2) for n, t, d in KV]]
KV_OUTPUTS = [Tensor("logits", "float32", ("batch_size", "seq_len", 512)),
              *[Tensor(f"{n}.{i}_RetainedState", t, d) for i in range(2) for n, t, d in KV]]
EMB_INPUTS = [Tensor("input_ids", "int64", ("batch_size", "seq_len")),
              Tensor("attention_mask", "int64", ("batch_size", "seq_len"))]
EMB_OUTPUTS = [Tensor("output", "float32", ("batch_size", 384))]
PREFILL_DECODE = [{"name": "Prefill", "symbols": {"batch_size": 1, "seq_len": 32, "ctx_len": 128}},
                  {"name": "Decode", "symbols": {"batch_size": 1, "seq_len": 1, "ctx_len": 128}}]
KV_TASK = {"transforms": {"apply": ["kv_cache"]}}
#: QEfficient/compile/qnn_config.json (reference 2.4)
SAMPLE_CONFIG = {"converter_args_extension": "", "context_binary_generator_args_extension": "--log_level debug",
                 "qnn_compilation_backend": {"compiler_enable_depth_first": True, "compiler_printDDRStats": False,
                                             "compiler_printPerfMetrics": False, "compiler_stat_level": 10},
                 "SKIP_QNN_CONVERTER_STEP": False}


def manifest(data: dict[str, Any]) -> Any:
    """A validated manifest from ``data``, with a model source (its value never reaches the tools)."""
    return to_manifest({**data, "model": {"path": "model-dir", **data.get("model", {})}})


def qnn(**options: Any) -> dict[str, Any]:
    return {"compile": {"backend": "qnn", "qnn": options}}


@dataclass
class Case:
    manifest: dict[str, Any]
    specs: list[dict[str, Any]] | None = field(default_factory=lambda: PREFILL_DECODE)  # None: the KV task's
    inputs: list[Tensor] = field(default_factory=lambda: KV_INPUTS)
    outputs: list[Tensor] = field(default_factory=lambda: KV_OUTPUTS)
    retained_state: bool = True
    config: dict[str, Any] | None = None  # a qnn_config file's content


CASES = {
    "prefill_decode": Case({**KV_TASK, **qnn()}),
    "causal_lm_3_specs": Case({**KV_TASK, **qnn()}, specs=[
        {"name": "Prefill_0", "symbols": {"batch_size": 1, "seq_len": 32, "ctx_len": 128}},
        {"name": "Prefill_1", "symbols": {"batch_size": 1, "seq_len": 64, "ctx_len": 128}},
        {"name": "Decode", "symbols": {"batch_size": 1, "seq_len": 1, "ctx_len": 128}}]),
    # seq.lengths=[1]: one specialisation (Prefill), one graph named model
    "single_spec": Case({**KV_TASK, "seq": {"lengths": [1], "ctx_len": 128}, **qnn()}, specs=None),
    "mxint8_num_devices_4": Case({**KV_TASK, **qnn(num_cores=14, mxint8_kv_cache=True, num_devices=4, mos=2,
                                                   aic_enable_depth_first=True, allow_mxint8_mdp_io=True,
                                                   mxfp6_matmul=True)}),
    "qnn_config_sample": Case({**KV_TASK, **qnn(converter_args_extension="--onnx_defer_loading")},
                              config=SAMPLE_CONFIG),
    "embedding_3_lengths": Case({"model": {"task": "embedding"}, **qnn()},
                                specs=[{"name": f"Embedding_{i}", "symbols": {"batch_size": 1, "seq_len": n}}
                                       for i, n in enumerate([32, 64, 128])],
                                inputs=EMB_INPUTS, outputs=EMB_OUTPUTS, retained_state=False),
}


def render(case: Case, tmp_path: Path) -> dict[str, str]:
    """What the backend would write for ``case``: the config files and the two commands (one argument a line)."""
    from qbuild.tasks import get_task

    data = case.manifest
    if case.config is not None:
        path = tmp_path / "qnn_config.json"
        path.write_text(json.dumps(case.config))
        data = {**data, "compile": {**data["compile"], "qnn": {**data["compile"]["qnn"], "config": str(path)}}}
    m = manifest(data)
    o = qnn_command.options(m, retained_state=case.retained_state, graph_dtype="float32")
    specs = get_task("causal_lm_kv").specializations(m) if case.specs is None else case.specs
    io = custom_io(o, [t.name for t in [*case.inputs, *case.outputs]])
    files = qnn_command.side_files(SDK, o, specs, case.inputs, case.outputs, io)
    return {**files, "converter.txt": "\n".join(qnn_command.converter_argv(SDK, o)) + "\n",
            "context_binary_generator.txt": "\n".join(qnn_command.generator_argv(SDK, o)) + "\n"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_commands_and_config_files_match_golden(name: str, tmp_path: Path) -> None:
    expected = {p.name: p.read_text(encoding="utf-8") for p in sorted((GOLDEN / name).iterdir())}
    got = render(CASES[name], tmp_path)
    assert sorted(got) == sorted(expected)
    for fname, text in expected.items():
        assert got[fname] == text, f"{name}/{fname} differs from the golden file"


def test_every_golden_directory_has_a_case() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(CASES)


def test_all_specialisations_are_read_not_the_first_two() -> None:
    specs = [{"name": f"S{i}", "symbols": {"batch_size": 1, "seq_len": 1, "ctx_len": c}}
             for i, c in enumerate([128, 128, 256])]
    kv = Tensor("past_key.0", "float32", ("batch_size", 2, "ctx_len", 16))
    # QEfficient compares spec 0 with spec 1 only and would write one shape; the third differs
    assert qnn_command.input_shape(kv, specs) == "(1, 2, 128, 16), (1, 2, 128, 16), (1, 2, 256, 16)"
    assert qnn_command.input_shape(Tensor("x", "float32", (3, 4)), specs) == "(3, 4)"
    assert qnn_command.graph_names(5)[-1] == "model_configuration_5"


def test_a_symbol_no_specialisation_gives_is_a_compile_error_naming_it() -> None:
    t = Tensor("pixel_values", "float32", ("batch_size", "img_size"))
    with pytest.raises(CompileError) as info:
        qnn_command.input_shape(t, PREFILL_DECODE)
    assert "'pixel_values'" in str(info.value) and "'img_size'" in str(info.value) and "Prefill" in str(info.value)


@pytest.mark.parametrize(("data", "key", "words"), [
    (qnn(converter_args_extension="--output_path /tmp/x.dlc"), "compile.qnn.converter_args_extension",
     ["--output_path", "set by qbuild"]),
    (qnn(converter_args_extension="--config=a.yaml"), "compile.qnn.converter_args_extension", ["--config=a.yaml"]),
    (qnn(context_binary_generator_args_extension="--backend libX.so"),
     "compile.qnn.context_binary_generator_args_extension", ["--backend", "--dlc_path"]),
    (qnn(converter_args_extension="--debug 'unclosed"), "compile.qnn.converter_args_extension",
     ["cannot split"]),
    (qnn(compilation_backend={"compiler_num_of_cores": 8}), "compile.qnn.compilation_backend.compiler_num_of_cores",
     ["compile.qnn.num_cores"]),
    (qnn(num_cores=65), "compile.qnn.num_cores", ["between 1 and 64"]),
    (qnn(converter_args_extension=3), "compile.qnn.converter_args_extension", ["expected str"]),
    (qnn(bogus=1), "compile.qnn.bogus", ["unknown key", "converter_args_extension"]),
    ({"compile": {"backend": "qnm"}}, "compile.backend", ["qnn", "did you mean 'qnn'"]),
])
def test_bad_manifest_options_name_the_key(data: dict[str, Any], key: str, words: list[str]) -> None:
    with pytest.raises(ManifestError) as info:
        manifest(data)
    assert info.value.key == key
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(("content", "words"), [
    ({**SAMPLE_CONFIG, "SKIP_QNN_CONVERTER_STEP": True}, ["SKIP_QNN_CONVERTER_STEP", "not supported"]),
    ({"converter_args_extension": "--input_network x.onnx"}, ["--input_network", "converter_args_extension in"]),
    ({"qnn_compilation_backend": ["x"]}, ["qnn_compilation_backend", "JSON object"]),
    ("{not json", ["not valid JSON"]),
    ([1, 2], ["JSON object"]),
])
def test_a_bad_qnn_config_file_names_compile_qnn_config(tmp_path: Path, content: Any, words: list[str]) -> None:
    path = tmp_path / "qnn_config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    m = manifest({**KV_TASK, **qnn(config=str(path))})
    with pytest.raises(ManifestError) as info:
        qnn_command.options(m, retained_state=True, graph_dtype="float32")
    assert info.value.key == "compile.qnn.config"
    for word in words:
        assert word in str(info.value)


def test_an_extension_in_the_file_and_the_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "qnn_config.json"
    path.write_text(json.dumps({"converter_args_extension": "--onnx_defer_loading"}))
    m = manifest({**KV_TASK, **qnn(config=str(path), converter_args_extension="--dry_run")})
    with pytest.raises(ManifestError, match="also set in compile.qnn.config") as info:
        qnn_command.options(m, retained_state=True, graph_dtype="float32")
    assert info.value.key == "compile.qnn.converter_args_extension"


def test_overrides_merge_file_then_manifest_and_a_log_level_flag_replaces_the_default(tmp_path: Path) -> None:
    path = tmp_path / "qnn_config.json"
    path.write_text(json.dumps({"qnn_compilation_backend": {"compiler_stat_level": 3, "compiler_perfWarnings": True}}))
    m = manifest({**KV_TASK, **qnn(config=str(path), compilation_backend={"compiler_stat_level": 7},
                                   context_binary_generator_args_extension="--log_level=verbose")})
    o = qnn_command.options(m, retained_state=True, graph_dtype="float32")
    cfg = qnn_command.backend_config(o, 2)
    assert (cfg["compiler_stat_level"], cfg["compiler_perfWarnings"]) == (7, True)
    argv = qnn_command.generator_argv(SDK, o)
    assert argv[-1] == "--log_level=verbose" and "error" not in argv


def test_discovery_from_qnn_sdk_root_and_the_version_in_the_key(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    m = manifest(qnn())
    assert qnn_sdk.discover(m) is None
    assert qnn_sdk.looked_for(m) == "$QNN_SDK_ROOT is not set (nor compile.qnn.sdk_dir)"
    root = tmp_path / "qnn"
    shutil.copytree(FAKE_SDK, root)
    monkeypatch.setenv("QNN_SDK_ROOT", str(root))
    sdk = qnn_sdk.discover(m)
    assert sdk == QnnSdk(str(root), "2.31.0.250130")
    assert qnn_sdk.fingerprint(sdk) == {"qnn-sdk": "2.31.0.250130"}
    (root / "sdk.yaml").write_text("name: qairt\n")  # no version: the file's digest stands in
    fp = qnn_sdk.fingerprint(qnn_sdk.discover(m))
    assert fp["qnn-sdk"] == "unversioned" and len(fp["qnn-sdk-sha256"]) == 64
    (root / "bin" / "x86_64-linux-clang" / "qairt-converter").unlink()
    assert qnn_sdk.discover(m) is None
    assert qnn_sdk.looked_for(m) == (f"looked for {root}/bin/x86_64-linux-clang/qairt-converter "
                                     f"($QNN_SDK_ROOT={root})")
    elsewhere = manifest(qnn(sdk_dir=str(tmp_path / "none")))
    assert "compile.qnn.sdk_dir=" in qnn_sdk.looked_for(elsewhere)

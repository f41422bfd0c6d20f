"""The qnn backend through the real engine: a real export of the tiny KV Llama, the stand-in QNN tool chain.

The QNN SDK cannot be installed here, so tests/fixtures/fake-qnn-sdk (its $QNN_SDK_ROOT layout, with stand-in
``qairt-converter`` and ``qnn-context-binary-generator`` that check their arguments, record argv and the files
they read, and write placeholder outputs, or fail / hang on request) runs instead. Running the program needs a
card and qaicrt: verify is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qbuild.api import build, plan
from qbuild.errors import CompileError, PlanError
from tests.conftest import ROOT, run_qbuild

pytestmark = pytest.mark.slow
FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-qnn-sdk"
QNN = ROOT / "manifests" / "tiny-llama-qnn.yaml"
CONVERTER, GENERATOR = "qairt-converter", "qnn-context-binary-generator"
FAKE_VARS = ("FAKE_QNN_MODE", "FAKE_QNN_LOG", "FAKE_QNN_PIDFILE")


def _private_sdk(where: Path) -> Path:
    root = where / "qnn-sdk"
    shutil.copytree(FAKE_SDK, root)
    return root


@pytest.fixture(scope="module")
def warm_qnn_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache holding a complete build of manifests/tiny-llama-qnn.yaml (through the stand-in tool chain)."""
    where = tmp_path_factory.mktemp("qnn")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QNN_SDK_ROOT", str(_private_sdk(where)))
        for var in FAKE_VARS:
            mp.delenv(var, raising=False)
        build(QNN, cache_dir=where / "cache")
    yield where / "cache"


@pytest.fixture
def sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the fake SDK as $QNN_SDK_ROOT; the tools log every call to ``calls.jsonl``."""
    root = _private_sdk(tmp_path)
    monkeypatch.setenv("QNN_SDK_ROOT", str(root))
    for var in FAKE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FAKE_QNN_LOG", str(tmp_path / "calls.jsonl"))
    return root


@pytest.fixture
def cache(warm_qnn_cache: Path, tmp_path: Path) -> Path:
    """A private copy of the warm cache that a test may change."""
    dst = tmp_path / "cache"
    shutil.copytree(warm_qnn_cache, dst, symlinks=True)
    return dst


def calls(tmp_path: Path) -> list[dict]:
    log = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def states(p) -> dict[str, str]:
    return {s.name: s.state for s in p.stages}


def compile_entries(cache: Path) -> list[Path]:
    return sorted((cache / "objects" / "compile").glob("*/record.json"))


def test_without_the_sdk_compile_qnn_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    with pytest.raises(PlanError) as info:
        plan(QNN, cache_dir=tmp_path / "cache")
    text = str(info.value)
    assert "compile.backend: qnn needs the QNN SDK; $QNN_SDK_ROOT is not set" in text
    assert "compile=onnxruntime" in text


def test_a_build_runs_both_tools_once_and_a_second_build_is_cached(sdk: Path, cache: Path, tmp_path: Path) -> None:
    r = build(QNN, ["compile.qnn.num_cores=8"], cache_dir=cache)
    assert [s["state"] for s in r.stages] == ["cached", "cached", "built"]
    out, onnx = Path(r.artifacts["compiled"]), Path(r.artifacts["onnx"])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "artifact.json", "command.json", "command.txt", "context_binary_generator.log", "converter.log",
        "custom_io_config.yaml", "qnn_compile_backend.json", "qnn_compiler_config.json", "qpc/programqpc.bin",
        "qpc/qnngraph.serialized.bin", "specializations.json"]
    converter, generator = calls(tmp_path)
    assert (converter["tool"], generator["tool"]) == (CONVERTER, GENERATOR)
    assert converter["argv"][:2] == ["--input_network", str(onnx)]
    assert converter["argv"][10:] == ["--preserve_io_datatype", "--onnx_skip_simplification", "--target_backend", "AIC"]
    assert generator["argv"][-2:] == ["--log_level", "error"]
    assert generator["argv"][generator["argv"].index("--backend") + 1] == f"{sdk}/lib/x86_64-linux-clang/libQnnAic.so"
    # the tools read the files the backend wrote: three graphs, each prefill bucket's shape, fp16 KV
    backend = json.loads(next(t for p, t in generator["files"].items() if p.endswith("qnn_compile_backend.json")))
    assert backend["graph_names"] == ["model_configuration_1", "model_configuration_2", "model_configuration_3"]
    assert backend["compiler_num_of_cores"] == 8
    (custom_io,) = converter["files"].values()
    assert "  Desired Model Parameters:\n    DataType: int64\n    Shape: (1, 32), (1, 128), (1, 1)\n" in custom_io
    assert "- Name: past_key.1_RetainedState\n  Desired Model Parameters:\n    DataType: float16\n" in custom_io
    record = json.loads((out / "command.json").read_text())
    assert record["argv"][0][:3] == [f"{sdk}/bin/x86_64-linux-clang/qairt-converter", "--input_network", "<onnx>"]
    assert record["ran"][0][1:] == converter["argv"] and record["ran"][1][1:] == generator["argv"]
    assert record["sdk"]["version"] == "2.31.0.250130"
    assert "Context binary generated" in (out / "context_binary_generator.log").read_text()
    assert not (out / "model.dlc").exists()  # a second copy of the weights that nothing runs
    again = build(QNN, ["compile.qnn.num_cores=8"], cache_dir=cache)
    assert [s["state"] for s in again.stages] == ["cached"] * 3 and len(calls(tmp_path)) == 2


def test_verify_is_skipped_because_the_program_needs_a_card(sdk: Path, cache: Path) -> None:
    p = plan(QNN, cache_dir=cache)
    assert [s.name for s in p.stages] == ["load", "export", "compile"]
    assert states(p) == {"load": "cached", "export": "cached", "compile": "cached"}
    assert p.notes[1].startswith("verify: skipped, the qnn artifact cannot run on this machine (a QNN build's "
                                 "programqpc.bin runs on a Cloud AI 100 card through the Cloud AI 100 runtime (qaicrt)")


@pytest.mark.parametrize(("mode", "tool", "calls_made"), [("fail-converter", CONVERTER, 1),
                                                          ("fail-generator", GENERATOR, 2)])
def test_a_failing_tool_is_a_compile_error_naming_the_tool_and_its_log(sdk: Path, cache: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch, mode: str,
                                                                       tool: str, calls_made: int) -> None:
    monkeypatch.setenv("FAKE_QNN_MODE", mode)
    before = compile_entries(cache)
    with pytest.raises(CompileError) as info:
        build(QNN, ["compile.qnn.num_cores=4"], cache_dir=cache)
    err = info.value
    assert str(err).startswith(f"{tool} failed (exit code 3)")
    assert err.returncode == 3 and err.command[0] == f"{sdk}/bin/x86_64-linux-clang/{tool}"
    assert "unsupported layout" in err.output_tail
    text = str(err)
    assert f"full {tool} log: " in text
    log = Path(text.split(f"full {tool} log: ")[1].split(";")[0].split("\n")[0].strip())
    assert "unsupported layout" in log.read_text() and log.read_text().startswith(f"$ {sdk}/bin/")
    assert len(calls(tmp_path)) == calls_made
    assert compile_entries(cache) == before and not list((cache / "staging").iterdir())


@pytest.mark.parametrize(("mode", "message"), [("nodlc", "qairt-converter exited 0 but wrote no model.dlc"),
                                               ("nobinary", "exited 0 but wrote no qpc/programqpc.bin")])
def test_a_missing_output_after_exit_0_is_a_failure(sdk: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                    mode: str, message: str) -> None:
    monkeypatch.setenv("FAKE_QNN_MODE", mode)
    with pytest.raises(CompileError, match=message):
        build(QNN, ["compile.qnn.num_cores=4"], cache_dir=cache)


def test_a_hang_hits_the_timeout_and_the_tool_is_killed(sdk: Path, cache: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QNN_MODE", "hang-generator")
    monkeypatch.setenv("FAKE_QNN_PIDFILE", str(tmp_path / "pid"))
    t0 = time.monotonic()
    with pytest.raises(CompileError, match=r"qnn-context-binary-generator ran past compile.qnn.timeout_s=2 s") as info:
        build(QNN, ["compile.qnn.timeout_s=2", "compile.qnn.num_cores=4"], cache_dir=cache)
    assert time.monotonic() - t0 < 30 and "hanging" in info.value.output_tail
    assert "raise compile.qnn.timeout_s" in str(info.value)
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize(("override", "reason"), [
    ("compile.qnn.num_cores=4", "compile.qnn.num_cores: 16 -> 4"),
    ("compile.qnn.mxfp6_matmul=true", "compile.qnn.mxfp6_matmul: false -> true"),
    ("compile.qnn.mxint8_kv_cache=true", "compile.qnn.mxint8_kv_cache: false -> true"),
    ("compile.qnn.num_devices=2", "compile.qnn.num_devices: 1 -> 2"),
    ("compile.qnn.mos=2", "compile.qnn.mos: null -> 2"),
    ("compile.qnn.aic_enable_depth_first=true", "compile.qnn.aic_enable_depth_first: false -> true"),
    ("compile.qnn.allow_mxint8_mdp_io=true", "compile.qnn.allow_mxint8_mdp_io: false -> true"),
    ("compile.qnn.converter_args_extension=--onnx_defer_loading",
     "compile.qnn.converter_args_extension:  -> --onnx_defer_loading"),
    ("compile.qnn.context_binary_generator_args_extension='--log_level debug'",
     "compile.qnn.context_binary_generator_args_extension:  -> --log_level debug"),
    ("+compile.qnn.compilation_backend.compiler_stat_level=3",
     'compile.qnn.compilation_backend: {} -> {"compiler_stat_level": 3}'),
])
def test_changing_one_qnn_option_recompiles_only_compile(sdk: Path, cache: Path, override: str, reason: str) -> None:
    p = plan(QNN, [override], cache_dir=cache)
    assert states(p) == {"load": "cached", "export": "cached", "compile": "build"}
    assert p.stage("compile").reasons == [reason]


def test_a_changed_option_rebuilds_compile_without_re_exporting(sdk: Path, cache: Path, tmp_path: Path) -> None:
    r = build(QNN, ["compile.qnn.mxint8_kv_cache=true"], cache_dir=cache)
    assert [s["state"] for s in r.stages] == ["cached", "cached", "built"]
    converter, generator = calls(tmp_path)
    assert "DataType: uint8" in next(iter(converter["files"].values()))
    assert generator["argv"][generator["argv"].index("--data_format_config") + 1].endswith(
        "/qnn_data_format_config.json")


def test_an_sdk_upgrade_recompiles_and_the_timeout_or_sdk_location_do_not(sdk: Path, cache: Path,
                                                                          tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(sdk, moved)
    p = plan(QNN, ["compile.qnn.timeout_s=5", f"compile.qnn.sdk_dir={moved}"], cache_dir=cache)
    assert states(p)["compile"] == "cached"
    (sdk / "sdk.yaml").write_text((sdk / "sdk.yaml").read_text().replace("2.31.0.250130", "2.32.0.250228"))
    p = plan(QNN, cache_dir=cache)
    assert states(p) == {"load": "cached", "export": "cached", "compile": "build"}
    assert p.stage("compile").reasons == ["qnn-sdk 2.31.0.250130 -> 2.32.0.250228"]


def test_plan_explain_prints_both_commands(sdk: Path, cache: Path) -> None:
    out = run_qbuild("plan", str(QNN), "compile.qnn.mos=2", "--explain", cache=cache, check=True).stdout
    lines = {line.strip().split(":", 1)[0]: line.strip() for line in out.splitlines()}
    onnx = next(cache.glob("objects/export/*/out/model.onnx"))
    assert lines["converter"] == (f"converter: {sdk}/bin/x86_64-linux-clang/qairt-converter --input_network {onnx} "
                                  "--output_path '<out>/model.dlc' --config '<out>/custom_io_config.yaml' "
                                  "--float_bias_bitwidth 32 --float_bitwidth 16 --preserve_io_datatype "
                                  "--onnx_skip_simplification --target_backend AIC")
    assert lines["generator"] == (f"generator: {sdk}/bin/x86_64-linux-clang/qnn-context-binary-generator "
                                  "--binary_file qnngraph.serialized --backend_binary programqpc.bin --output_dir "
                                  f"'<out>/qpc' --backend {sdk}/lib/x86_64-linux-clang/libQnnAic.so --dlc_path "
                                  "'<out>/model.dlc' --config_file '<out>/qnn_compiler_config.json' --log_level error")
    assert '"compiler_max_out_channel_split":"2"' in lines["qnn_compile_backend.json"]


def test_qnn_settings_with_another_backend_are_named_as_unused(sdk: Path, cache: Path) -> None:
    p = plan(QNN, ["compile=onnxruntime", "compile.qnn.num_cores=4"], cache_dir=cache)
    assert "compile.qnn.num_cores: 4 is not used: the compile backend is onnxruntime" in p.notes

"""The qaic command line and side files against hand-written golden files; discovery and flag checks.

Pure functions only (no torch, no SDK): each case shows its whole input, the expected output is in
tests/golden/qaic/<case>/ (typed from the reference, see its README).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qbuild.backends import qaic_command, qaic_sdk
from qbuild.backends.qaic_sdk import Sdk
from qbuild.errors import ManifestError
from qbuild.manifest.validate import to_manifest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "qaic"
FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-sdk"
SDK = Sdk("/opt/qti-aic/exec/qaic-compile", "qaic-compile", "1.21.2.0", "1.21.2.0", "/opt/qti-aic")
OLD_SDK = Sdk("/opt/qti-aic/exec/qaic-exec", "qaic-exec", "1.20.0.0", "1.20.0.0", "/opt/qti-aic")
# a 2-layer retained-state KV graph, as the causal-LM KV export names it (reference §3.3)
KV_IO = ["input_ids", "position_ids", "past_key.0", "past_value.0", "past_key.1", "past_value.1", "logits",
         "past_key.0_RetainedState", "past_value.0_RetainedState", "past_key.1_RetainedState",
         "past_value.1_RetainedState"]
KV_IO_FUNCTIONS = [n.replace("_RetainedState", "_InternalRetainedState") for n in KV_IO]
EMB_IO = ["input_ids", "attention_mask", "output"]
PREFILL_DECODE = [{"name": "Prefill", "symbols": {"batch_size": 1, "seq_len": 32, "ctx_len": 128}},
                  {"name": "Decode", "symbols": {"batch_size": 1, "seq_len": 1, "ctx_len": 128}}]
KV = {"transforms": {"apply": ["kv_cache"]}}
# issue 13: the two programs of a VLM (reference qefficient-modes.md 1.3, 1.4, 1.6)
VISION_IO = ["pixel_values", "vision_embeds"]
LANG_IO = ["input_ids", "vision_embeds", "position_ids", "image_idx", *KV_IO[2:6], "logits",
           "vision_embeds_RetainedState", "image_idx_output", *KV_IO[7:]]
# vlm.mode single: one program, pixel_values retained (1.5 single-QPC specialisations, 1.6 single QPC custom_io)
SINGLE_IO = ["pixel_values", "input_ids", "position_ids", "image_idx", *KV_IO[2:6], "logits",
             "pixel_values_RetainedState", "image_idx_output", *KV_IO[7:]]
VLM = {"model": {"task": "image-text-to-text"}, "compile": {"backend": "qaic", "qaic": {"num_cores": 16}}}


def manifest(data: dict[str, Any]) -> Any:
    """A validated manifest from ``data``, with a model source (its value never reaches the compiler)."""
    return to_manifest({**data, "model": {"path": "model-dir", **data.get("model", {})}})


@dataclass
class Case:
    manifest: dict[str, Any]
    specs: list[dict[str, Any]] | None = field(default_factory=lambda: PREFILL_DECODE)  # None: the KV task's
    io: list[str] = field(default_factory=lambda: KV_IO)
    sdk: Sdk = SDK
    retained_state: bool = True
    vision_io: bool = False  # a VLM program: pixel_values / vision_embeds in custom_io.yaml


CASES = {
    "causal_lm_2_prefill": Case({**KV, "compile": {"backend": "qaic", "qaic": {"num_cores": 16}}}, specs=[
        {"name": "Prefill_0", "symbols": {"batch_size": 1, "seq_len": 32, "ctx_len": 128}},
        {"name": "Prefill_1", "symbols": {"batch_size": 1, "seq_len": 64, "ctx_len": 128}},
        {"name": "Decode", "symbols": {"batch_size": 1, "seq_len": 1, "ctx_len": 128}}]),
    "embedding_3_lengths": Case({"model": {"task": "embedding"},
                                 "compile": {"backend": "qaic", "qaic": {"num_cores": 16}}},
                                specs=[{"name": f"Embedding_{i}", "symbols": {"batch_size": 1, "seq_len": n}}
                                       for i, n in enumerate([32, 64, 128])], io=EMB_IO, retained_state=False),
    "mxfp6_matmul": Case({**KV, "compile": {"backend": "qaic", "qaic": {"num_cores": 16, "mxfp6_matmul": True}}}),
    "mxint8_kv_cache": Case({**KV, "compile": {"backend": "qaic",
                                               "qaic": {"num_cores": 16, "mxint8_kv_cache": True}}}),
    "num_devices_4": Case({**KV, "compile": {"backend": "qaic", "qaic": {"num_cores": 16, "num_devices": 4}}}),
    "mos_depth_first": Case({**KV, "compile": {"backend": "qaic",
                                               "qaic": {"num_cores": 16, "mos": 1, "aic_enable_depth_first": True}}}),
    "ai200_bf16": Case({**KV, "model": {"dtype": "bfloat16"},
                        "compile": {"backend": "qaic", "qaic": {"num_cores": 16, "aic_hw_version": "ai200"}}}),
    # QEfficient loads a bfloat16 model as float32 on ai100 (no bf16 there): -convert-to-fp16, float16 KV
    "ai100_bf16": Case({**KV, "model": {"dtype": "bfloat16"},
                        "compile": {"backend": "qaic", "qaic": {"num_cores": 16, "aic_hw_version": "ai100"}}}),
    # seq.lengths=[1]: one specialisation, named Prefill (QEfficient omits the duplicate Decode)
    "prefill_len_1": Case({**KV, "seq": {"lengths": [1], "ctx_len": 128},
                           "compile": {"backend": "qaic", "qaic": {"num_cores": 16}}}, specs=None),
    "old_sdk_flat": Case({**KV, "compile": {"backend": "qaic", "qaic": {"num_cores": 16}}}, sdk=OLD_SDK),
    "subfunctions_extra_flags": Case(
        {**KV, "compile": {"backend": "qaic",
                           "qaic": {"num_cores": 16, "ols": 2, "node_precision_info": "fp32_nodes.yaml",
                                    "use_onnx_subfunctions": True,
                                    "extra_flags": {"stats-batchsize": 4, "-aic-perf-metrics": True,
                                                    "aic-pmu-recipe": False}}}},
        io=KV_IO_FUNCTIONS),
    "vlm_vision": Case(VLM, specs=[{"name": "Vision", "symbols": {"batch_size": 1, "max_num_tiles": 17,
                                                                  "img_size": 336}}],
                       io=VISION_IO, retained_state=False, vision_io=True),
    "vlm_language": Case(VLM, specs=[{"name": n, "symbols": {**s["symbols"], "vision_size": 20}}
                                     for n, s in zip(["Prefill", "Decode"], PREFILL_DECODE, strict=True)],
                         io=LANG_IO, vision_io=True),
    "vlm_single": Case(VLM, specs=[{"name": n, "symbols": {**s["symbols"], "img_size": 896, "vision_size": 256,
                                                           "vision_batch_size": 1}}
                                   for n, s in zip(["Prefill", "Decode"], PREFILL_DECODE, strict=True)],
                       io=SINGLE_IO, vision_io=True),
}


def render(case: Case) -> dict[str, str]:
    """What the backend would write for ``case``: the side files and the command (one argument a line)."""
    from qbuild.tasks import get_task

    m = manifest(case.manifest)
    hw = m.compile.qaic.aic_hw_version or "ai100"
    dtype = qaic_command.export_dtype(m.model.dtype, hw) if case.retained_state else None  # the KV task's export
    o = qaic_command.options(m, sdk=case.sdk, hw_version=hw, spec_format=qaic_sdk.specializations_format(m, case.sdk),
                             retained_state=case.retained_state, graph_dtype=dtype, vision_io=case.vision_io)
    specs = get_task("causal_lm_kv").specializations(m) if case.specs is None else case.specs
    files = qaic_command.side_files(o, specs, case.io)
    cmd = qaic_command.argv(o, custom_io=qaic_command.CUSTOM_IO_FILE in files)
    return {**files, "command.txt": "\n".join(cmd) + "\n"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_command_and_side_files_match_golden(name: str) -> None:
    expected = {p.name: p.read_text(encoding="utf-8") for p in sorted((GOLDEN / name).iterdir())}
    got = render(CASES[name])
    assert sorted(got) == sorted(expected)
    for fname, text in expected.items():
        assert got[fname] == text, f"{name}/{fname} differs from the golden file"


def test_every_golden_directory_has_a_case() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(CASES)


def test_the_named_format_needs_the_1_21_sdk_unless_the_manifest_says() -> None:
    m = manifest({"compile": {"backend": "qaic"}})
    fmt = qaic_sdk.specializations_format
    assert fmt(m, SDK) == "named" and fmt(m, OLD_SDK) == "flat" and fmt(m, None) == "flat"
    assert fmt(m, Sdk("c", "qaic-compile", "1.22.0.5")) == "named"
    assert fmt(m, Sdk("c", "qaic-compile", "garbage")) == "flat"
    flat = manifest({"compile": {"qaic": {"specializations_format": "flat"}}})
    named = manifest({"compile": {"qaic": {"specializations_format": "named"}}})
    assert fmt(flat, SDK) == "flat" and fmt(named, OLD_SDK) == "named"


@pytest.mark.parametrize(("flags", "message"), [
    ({"aic-num-cores": 4}, "use compile.qaic.num_cores instead"),
    ({"-mos": 2}, "use compile.qaic.mos instead"),
    ({"aic-binary-dir": "/tmp/x"}, "is set by qbuild"),
    ({"device-group": [0, 1]}, "expected true, false, a number or a string"),
    ({"bad flag": True}, "is not a compiler flag name"),
    ({"x=1": True}, "is not a compiler flag name"),
])
def test_extra_flags_are_checked(flags: dict[str, Any], message: str) -> None:
    m = manifest({"compile": {"qaic": {"extra_flags": flags}}})
    with pytest.raises(ManifestError, match=message) as info:
        qaic_command.extra_flags(m)
    assert info.value.key and info.value.key.startswith("compile.qaic.extra_flags.")


def _params(tmp_path: Path, **compile_: Any) -> dict[str, Any]:
    m = manifest({**KV, "compile": {"backend": "qaic", **compile_}})
    from qbuild.backends.qaic import qaic_params
    from qbuild.plan.params import keyed
    from qbuild.tasks import get_task

    return keyed(qaic_params(m, get_task("causal_lm_kv"), SDK, m.compile.qaic.aic_hw_version or "ai100"))


@pytest.mark.parametrize("change", [
    {"qaic": {"num_cores": 8}}, {"qaic": {"mxfp6_matmul": True}}, {"qaic": {"mxint8_kv_cache": True}},
    {"qaic": {"num_devices": 2}},
    {"qaic": {"mos": 2}}, {"qaic": {"aic_enable_depth_first": True}}, {"qaic": {"ols": 2}},
    {"qaic": {"aic_hw_version": "ai200"}}, {"qaic": {"convert_to_fp16": False}},
    {"qaic": {"specializations_format": "flat"}}, {"qaic": {"extra_flags": {"aic-perf-metrics": True}}},
    {"qaic": {"use_onnx_subfunctions": True}},
])
def test_every_flag_changes_the_key_params(tmp_path: Path, change: dict[str, Any]) -> None:
    assert _params(tmp_path, **change) != _params(tmp_path)


@pytest.mark.parametrize("change", [
    {"qaic": {"timeout_s": 5}}, {"qaic": {"compiler": "/elsewhere/qaic-compile"}}, {"qaic": {"sdk_dir": "/x"}},
    {"qaic": {"extra_flags": {"aic-perf-metrics": False}}}, {"qaic": {"device_group": [3]}},
    {"onnxruntime": {"graph_optimization": "all"}}, {"onnxruntime": {"threads": 8}},
])
def test_what_does_not_change_the_command_does_not_change_the_key_params(tmp_path: Path,
                                                                         change: dict[str, Any]) -> None:
    assert _params(tmp_path, **change) == _params(tmp_path)


def test_node_precision_info_is_keyed_by_content_not_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b" / "fp32.yaml"
    b.parent.mkdir()
    a.write_text("FP32NodeInstanceNames:\n  - /model/norm/Mul\n")
    shutil.copy(a, b)
    pa = _params(tmp_path, qaic={"node_precision_info": str(a)})
    pb = _params(tmp_path, qaic={"node_precision_info": str(b)})
    assert pa == pb and str(tmp_path) not in repr(pa)
    b.write_text("FP32NodeInstanceNames: []\n")
    assert _params(tmp_path, qaic={"node_precision_info": str(b)}) != pa
    with pytest.raises(ManifestError, match="compile.qaic.node_precision_info: cannot read"):
        _params(tmp_path, qaic={"node_precision_info": str(tmp_path / "missing.yaml")})


def test_versions_come_from_the_sdk_version_files(tmp_path: Path) -> None:
    assert qaic_sdk.read_version(FAKE_SDK / "versions" / "apps.xml") == "1.21.2.0"
    assert qaic_sdk.read_version(FAKE_SDK / "versions" / "platform.xml") == "1.21.2.0"
    assert qaic_sdk.read_version(tmp_path / "missing.xml") is None
    (tmp_path / "bad.xml").write_text("<versions><ci_build>")
    assert qaic_sdk.read_version(tmp_path / "bad.xml") is None
    assert qaic_sdk.version_tuple("1.21.2.0") == (1, 21, 2, 0) and qaic_sdk.version_tuple(None) is None


def test_discovery_in_an_sdk_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAIC_SDK_DIR", str(FAKE_SDK))
    sdk = qaic_sdk.discover(manifest({}))
    assert sdk is not None and sdk.kind == "qaic-compile" and sdk.apps_version == "1.21.2.0"
    assert qaic_sdk.fingerprint(sdk) == {"qaic-compiler": "qaic-compile", "qaic-apps-sdk": "1.21.2.0",
                                         "qaic-platform-sdk": "1.21.2.0"}
    old = tmp_path / "sdk"
    (old / "exec").mkdir(parents=True)
    shutil.copy(FAKE_SDK / "exec" / "qaic-compile", old / "exec" / "qaic-exec")
    monkeypatch.setenv("QAIC_SDK_DIR", str(old))
    sdk = qaic_sdk.discover(manifest({}))
    assert sdk is not None and sdk.kind == "qaic-exec" and sdk.apps_version is None
    assert set(qaic_sdk.fingerprint(sdk)) == {"qaic-compiler", "qaic-compiler-sha256"}
    monkeypatch.setenv("QAIC_SDK_DIR", str(tmp_path / "none"))
    m = manifest({})
    assert qaic_sdk.discover(m) is None
    assert qaic_sdk.looked_for(m) == (f"looked for {tmp_path}/none/exec/qaic-compile and "
                                      f"{tmp_path}/none/exec/qaic-exec ($QAIC_SDK_DIR)")


def test_hw_version_from_the_manifest_qaic_util_or_the_default(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert qaic_sdk.parse_hw_version("QID 0\n\tFW IMAGE_VARIANT:AIC200_ES\n") == "ai200"
    assert qaic_sdk.parse_hw_version("QID 0\n\tFW IMAGE_VARIANT:AIC100_ES\n") == "ai100"
    assert qaic_sdk.hw_version(manifest({"compile": {"qaic": {"aic_hw_version": "ai200"}}}), SDK)[0] == "ai200"
    sdk = tmp_path / "sdk"
    shutil.copytree(FAKE_SDK, sdk)
    monkeypatch.setenv("FAKE_QAIC_VARIANT", "AIC200")
    found = Sdk(str(sdk / "exec" / "qaic-compile"), "qaic-compile", root=str(sdk))
    assert qaic_sdk.hw_version(manifest({}), found) == ("ai200", f"detected by {sdk}/tools/qaic-util -q: "
                                                                 "QID 0 AIC200_ES")
    nothing = Sdk("c", "qaic-compile", root=str(tmp_path / "no-sdk"))
    assert qaic_sdk.hw_version(manifest({}), nothing)[0] == "ai100"


def test_vlm_custom_io_follows_the_dtype_map_and_the_bf16_rule() -> None:
    """pixel_values / vision_embeds take the mapped model dtype; no custom-IO file when the model and its KV are
    bfloat16 (QEfficient 1.6), but with an mxint8 KV the language program's vision_embeds stay bfloat16."""
    def io(data: dict[str, Any], retained: bool, names: list[str]) -> str | None:
        m = manifest({**VLM, **data})
        o = qaic_command.options(m, sdk=SDK, hw_version="ai200", spec_format="named", retained_state=retained,
                                 vision_io=True)
        return qaic_command.side_files(o, [], names).get(qaic_command.CUSTOM_IO_FILE)

    bf16 = {"model": {"task": "image-text-to-text", "dtype": "bfloat16"}}
    assert io(bf16, False, VISION_IO) is None and io(bf16, True, LANG_IO) is None
    mxint8 = {**bf16, "compile": {"backend": "qaic", "qaic": {"mxint8_kv_cache": True}}}
    text = io(mxint8, True, LANG_IO)
    assert text is not None and text.startswith(" - IOName: vision_embeds\n   Precision: bfloat16\n\n - IOName: "
                                                "vision_embeds_RetainedState\n   Precision: bfloat16\n\n - IOName: "
                                                "past_key.0\n   Precision: mxint8\n")
    assert io({"model": {"task": "image-text-to-text", "dtype": "float16"}}, False, VISION_IO) == (
        " - IOName: pixel_values\n   Precision: float16\n\n - IOName: vision_embeds\n   Precision: float16\n\n")
    assert io({}, True, KV_IO) == render(CASES["causal_lm_2_prefill"])["custom_io.yaml"]  # no vision names: KV only


def test_kv_custom_io_keeps_only_the_graphs_names() -> None:
    io = ["input_ids", "past_key.1", "past_value.1", "past_key.10", "past_key.1_RetainedState", "logits"]
    assert qaic_command.kv_custom_io(io, "float16") == [
        ("past_key.1", "float16"), ("past_key.1_RetainedState", "float16"), ("past_value.1", "float16"),
        ("past_key.10", "float16")]


# --- issue 17: what QEfficient hands the compiler ---------------------------------------------------------

def _qaic_util(tmp_path: Path, output: str, status: int = 0) -> Sdk:
    """An SDK whose qaic-util -q prints ``output`` and exits ``status``."""
    root = tmp_path / f"sdk-{abs(hash((output, status)))}"
    (root / "tools").mkdir(parents=True)
    tool = root / "tools" / "qaic-util"
    (root / "output.txt").write_text(output)
    tool.write_text(f"#!/bin/sh\ncat '{root}/output.txt'\nexit {status}\n")
    tool.chmod(0o755)
    return Sdk(str(root / "exec" / "qaic-compile"), "qaic-compile", root=str(root))


TWO_CARDS = "QID 0\n\tStatus:Ready\n\tFW IMAGE_VARIANT:AIC100_ES\nQID 1\n\tStatus:Ready\n\tFW IMAGE_VARIANT:AIC200_ES\n"


def test_qaic_util_output_is_read_case_insensitively_per_card() -> None:
    assert qaic_sdk.parse_devices(TWO_CARDS) == {0: "AIC100_ES", 1: "AIC200_ES"}
    assert qaic_sdk.parse_devices("qid 3\n  fw image_variant : aic200_x\n") == {3: "AIC200_X"}
    assert qaic_sdk.parse_hw_version("qid 0\n\tfw image_variant:aic200_es\n") == "ai200"
    assert qaic_sdk.parse_hw_version(TWO_CARDS) == "ai100"  # the first card, as QEfficient
    assert qaic_sdk.parse_hw_version(TWO_CARDS, [1]) == "ai200"
    assert qaic_sdk.parse_hw_version("\tNSP IMAGE_VARIANT:AIC200\n") == "ai100"  # only FW IMAGE_VARIANT counts
    assert qaic_sdk.parse_hw_version("") == "ai100"


def test_hw_is_detected_from_the_output_whatever_the_exit_status(tmp_path: Path) -> None:
    sdk = _qaic_util(tmp_path, "QID 0\n\tFW IMAGE_VARIANT:AIC200_ES\nqaic-util: 1 device busy\n", status=1)
    h = qaic_sdk.detect_hardware(manifest({}), sdk)
    assert (h.version, h.devices, h.targets) == ("ai200", ((0, "AIC200_ES"),), (0,))
    none = _qaic_util(tmp_path, "no card\n", status=3)
    assert qaic_sdk.detect_hardware(manifest({}), none).version == "ai100"


def test_hw_is_that_of_the_device_group(tmp_path: Path) -> None:
    from qbuild.errors import PlanError

    sdk = _qaic_util(tmp_path, TWO_CARDS)
    group = lambda g: manifest({"compile": {"qaic": {"device_group": g, "num_devices": len(g)}}})  # noqa: E731
    assert qaic_sdk.detect_hardware(manifest({}), sdk).version == "ai100"
    assert qaic_sdk.detect_hardware(group([1]), sdk).version == "ai200"
    h = qaic_sdk.detect_hardware(group([0]), sdk)
    assert (h.version, h.targets) == ("ai100", (0,)) and "QID 0 AIC100_ES" in h.why
    with pytest.raises(PlanError, match="targeted cards differ in hardware"):
        qaic_sdk.detect_hardware(group([0, 1]), sdk)
    with pytest.raises(PlanError, match=r"card\(s\) \[5\] not listed"):
        qaic_sdk.detect_hardware(group([5]), sdk)
    forced = manifest({"compile": {"qaic": {"device_group": [5], "aic_hw_version": "ai200"}}})
    assert qaic_sdk.detect_hardware(forced, sdk).version == "ai200"  # the manifest wins; nothing is asked


def test_device_group_is_checked() -> None:
    with pytest.raises(ManifestError, match="num_devices=2"):
        manifest({"compile": {"qaic": {"device_group": [0, 1]}}})
    with pytest.raises(ManifestError, match="names a card twice"):
        manifest({"compile": {"qaic": {"device_group": [1, 1], "num_devices": 2}}})
    with pytest.raises(ManifestError, match="out of range"):
        manifest({"compile": {"qaic": {"device_group": [-1]}}})


def test_bf16_is_exported_in_float32_on_ai100_only() -> None:
    assert qaic_command.export_dtype("bfloat16", "ai100") == "float32"
    assert qaic_command.export_dtype("bfloat16", "ai200") == "bfloat16"
    assert qaic_command.export_dtype("float16", "ai100") == "float16"
    m = manifest({**KV, "model": {"dtype": "bfloat16"}, "compile": {"backend": "qaic"}})
    from qbuild.backends.qaic import qaic_params
    from qbuild.tasks import get_task

    kv, emb = get_task("causal_lm_kv"), get_task("embedding")
    on_100, on_200 = qaic_params(m, kv, SDK, "ai100").options, qaic_params(m, kv, SDK, "ai200").options
    assert (on_100.graph_dtype, on_100.convert_to_fp16, on_100.kv_precision) == ("float32", True, "float16")
    assert (on_200.graph_dtype, on_200.convert_to_fp16, on_200.kv_precision) == ("bfloat16", False, None)
    # a task that does not export the qaic form keeps its bfloat16 graph and gets no conversion flag
    assert not qaic_params(m, emb, SDK, "ai100").options.convert_to_fp16


def test_sub_functions_follow_the_option_not_the_graph(tmp_path: Path) -> None:
    o = qaic_command.options(manifest({**KV}), sdk=SDK, hw_version="ai100", spec_format="named", retained_state=True)
    assert "-sub-functions" not in qaic_command.argv(o)
    on = manifest({**KV, "compile": {"qaic": {"use_onnx_subfunctions": True}}})
    o = qaic_command.options(on, sdk=SDK, hw_version="ai100", spec_format="named", retained_state=True)
    assert qaic_command.argv(o)[-5:-3] == ["-aic-num-cores=16", "-sub-functions"]
    with pytest.raises(ManifestError, match="use compile.qaic.use_onnx_subfunctions instead"):
        qaic_command.extra_flags(manifest({"compile": {"qaic": {"extra_flags": {"sub-functions": True}}}}))


def test_json_side_files_are_written_as_qefficient_create_json() -> None:
    """indent 4, "," and ":" separators, sorted keys, no trailing newline (QEfficient's create_json)."""
    text = qaic_command.specializations_json([{"name": "Decode", "symbols": {"seq_len": 1, "batch_size": 2}}], "named")
    assert text == ('{\n    "specializations":[\n        {\n            "name":"Decode",\n'
                    '            "symbols":{\n                "batch_size":"2",\n                "seq_len":"1"\n'
                    '            }\n        }\n    ]\n}')
    assert qaic_command.mdp_json(1, 4) == ('{\n    "connections":[\n        {\n            "devices":[\n'
                                           '                0\n            ],\n            "type":"p2p"\n        }\n'
                                           '    ],\n    "partitions":[\n        {\n            "devices":[\n'
                                           '                {\n                    "deviceId":0,\n'
                                           '                    "numCores":4\n                }\n            ],\n'
                                           '            "name":"Partition0"\n        }\n    ]\n}')


def test_kv_specializations_name_a_lone_length_1_prefill() -> None:
    from qbuild.tasks import get_task

    task = get_task("causal_lm_kv")
    one = task.specializations(manifest({**KV, "seq": {"lengths": [1], "ctx_len": 64}}))
    assert one == [{"name": "Prefill", "symbols": {"batch_size": 1, "seq_len": 1, "ctx_len": 64}}]
    both = task.specializations(manifest({**KV, "seq": {"lengths": [1, 16], "ctx_len": 64}}))
    assert [s["name"] for s in both] == ["Prefill", "Decode"] and both[0]["symbols"]["seq_len"] == 16


def test_use_onnx_subfunctions_is_refused_for_a_task_without_layer_functions(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    from qbuild.backends.qaic import QaicBackend
    from qbuild.errors import PlanError
    from qbuild.store import Store
    from qbuild.tasks import get_task

    monkeypatch.setenv("QAIC_SDK_DIR", str(FAKE_SDK))
    m = manifest({"model": {"task": "embedding"},
                  "compile": {"backend": "qaic", "qaic": {"use_onnx_subfunctions": True}}})
    with pytest.raises(PlanError, match="compile.qaic.use_onnx_subfunctions: not yet supported for the embedding"):
        QaicBackend().resolve(m, get_task("embedding"), Store(tmp_path / "c", readonly=True).stats)

"""End to end on CPU: manifests -> plan -> cache -> ONNX -> ONNX Runtime -> verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qbuild.api import build, plan
from tests.conftest import ROOT, TINY, json_lines, run_qbuild

pytestmark = pytest.mark.slow
STAGES = ["load", "export", "compile", "verify"]


def _states(p) -> dict[str, str]:
    return {s.name: s.state for s in p.stages}


def test_fresh_build_builds_every_stage_and_the_artifact_runs(tmp_path: Path) -> None:
    import onnxruntime as ort

    proc = run_qbuild(str(TINY), "--json", cache=tmp_path / "cache", check=True)
    events = json_lines(proc.stdout)
    summary = events[-1]
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert all(s["state"] == "built" for s in summary["stages"])
    assert {e["event"] for e in events[:-1]} >= {"plan", "stage_started", "stage_built"}
    compiled = Path(summary["artifacts"]["compiled"])
    sess = ort.InferenceSession(str(compiled / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]], dtype=np.int64)
    (logits,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)})
    assert logits.shape == (2, 5, 512) and np.isfinite(logits).all()
    report = json.loads(Path(summary["artifacts"]["report"]).read_text())
    assert report["max_abs_diff"] <= report["atol"] == 1e-4


def test_second_build_is_cached_without_torch(tiny_cache: Path) -> None:
    code = (
        "import sys, json\n"
        "from qbuild.api import build\n"
        f"r = build({str(TINY)!r})\n"
        "print(json.dumps({'states': [s['state'] for s in r.stages],"
        " 'heavy': sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules)}))"
    )
    env = {**os.environ, "QBUILD_CACHE": str(tiny_cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["states"] == ["cached"] * 4
    assert result["heavy"] == []
    cli = run_qbuild(str(TINY), cache=tiny_cache, check=True)
    assert cli.stdout.count(" cached ") == 4


def test_changed_compile_flag_rebuilds_compile_and_verify_only(tiny_cache: Path) -> None:
    proc = run_qbuild("plan", str(TINY), "compile.onnxruntime.threads=1", cache=tiny_cache, check=True)
    assert "compile.onnxruntime.threads: 2 -> 1" in proc.stdout
    p = plan(TINY, ["compile.onnxruntime.threads=1"], cache_dir=tiny_cache)
    assert _states(p) == {"load": "cached", "export": "cached",
                          "compile": "build", "verify": "build"}
    assert p.stage("compile").reasons == ["compile.onnxruntime.threads: 2 -> 1"]
    assert p.stage("verify").reasons == ["upstream compile rebuilt"]
    objects = sorted((tiny_cache / "objects").rglob("record.json"))
    r = build(TINY, ["compile.onnxruntime.threads=1"], cache_dir=tiny_cache)
    assert [s["state"] for s in r.stages] == ["cached"] * 2 + ["built"] * 2
    session = json.loads((Path(r.artifacts["compiled"]) / "session.json").read_text())
    assert session["intra_op_num_threads"] == 1
    assert len(sorted((tiny_cache / "objects").rglob("record.json"))) == len(objects) + 2


def test_yaml_and_toml_manifests_have_identical_keys(tmp_path: Path) -> None:
    y = plan(TINY, ["compile.onnxruntime.threads=3"], cache_dir=tmp_path)
    t = plan(TINY.with_suffix(".toml"), ["compile.onnxruntime.threads=3"], cache_dir=tmp_path)
    assert [s.key for s in y.stages] == [s.key for s in t.stages]
    assert not tmp_path.joinpath("objects").exists()


def test_changed_weight_byte_rebuilds_from_load(tmp_path: Path, write_manifest) -> None:
    from qbuild.models.source import init_random

    model_dir = tmp_path / "model"
    init_random("llama", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 128}, 0,
                "float32", model_dir)
    m = write_manifest({"defaults": ["_self_"], "model": {"path": str(model_dir)}})
    cache = tmp_path / "cache"
    build(m, cache_dir=cache)
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # a byte of tensor data
    weights.write_bytes(bytes(data))
    p = plan(m, cache_dir=cache)
    assert all(s.state == "build" for s in p.stages)
    assert p.stage("load").reasons == ["weights: model.safetensors changed"]
    assert p.stage("export").reasons == ["upstream load rebuilt"]
    r = build(m, cache_dir=cache)
    assert [s["state"] for s in r.stages] == ["built"] * 4
    assert build(m, cache_dir=cache).stages[0]["state"] == "cached"


def test_changed_tool_fingerprint_rebuilds_dependent_stages_only(tiny_cache: Path, tmp_path: Path) -> None:
    import onnxruntime

    fake = tmp_path / "fake-dists" / "onnxruntime-9.9.9.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime\nVersion: 9.9.9\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT)])}
    proc = run_qbuild("plan", str(TINY), "--json", cache=tiny_cache, env=env, check=True)
    rows = {s["name"]: s for s in json.loads(proc.stdout)["stages"]}
    assert {n: r["state"] for n, r in rows.items()} == {
        "load": "cached", "export": "cached", "compile": "build", "verify": "build"}
    assert rows["compile"]["reasons"] == [f"onnxruntime {onnxruntime.__version__} -> 9.9.9"]
    assert rows["verify"]["reasons"] == [f"onnxruntime {onnxruntime.__version__} -> 9.9.9",
                                         "upstream compile rebuilt"]
    out = run_qbuild(str(TINY), "--json", cache=tiny_cache, env=env, check=True)
    assert [s["state"] for s in json_lines(out.stdout)[-1]["stages"]] == ["cached"] * 2 + ["built"] * 2


def test_corrupt_cached_file_is_reported_and_rebuilt(tiny_cache: Path) -> None:
    p = plan(TINY, cache_dir=tiny_cache)
    onnx_file = p.stage("compile").entry.out / "model.onnx"
    onnx_file.chmod(0o644)
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    proc = run_qbuild("plan", str(TINY), cache=tiny_cache, check=True)
    assert "cached output corrupt: model.onnx digest mismatch" in proc.stdout
    r = build(TINY, cache_dir=tiny_cache)
    assert [s["state"] for s in r.stages] == ["cached", "cached", "built", "cached"]
    assert all(s.state == "cached" for s in plan(TINY, cache_dir=tiny_cache).stages)


def test_sigkill_during_export_leaves_no_entry(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # a larger model so that export lasts long enough to be killed in the middle
    big = ["model.config.num_hidden_layers=8", "model.config.hidden_size=256",
           "model.config.intermediate_size=1024", "model.config.num_attention_heads=8"]
    export_key = plan(TINY, big, cache_dir=cache).stage("export").key
    env = {**os.environ, "QBUILD_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "qbuild", str(TINY), *big, "--json"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait for export to start, then for its staging directory
        if '"stage_started"' in line and '"export"' in line:
            break
    deadline = time.monotonic() + 30
    while not list((cache / "staging").glob(f"{export_key}.*")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((cache / "staging").glob(f"{export_key}.*")), "export was not in progress"
    assert not (cache / "objects" / "export" / export_key).exists()
    assert plan(TINY, big, cache_dir=cache).stage("export").state == "build"
    r = build(TINY, big, cache_dir=cache)
    assert [s["state"] for s in r.stages][1:] == ["built"] * 3
    assert not list((cache / "staging").iterdir())


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("compile.onnxruntime.thread=2", ["compile.onnxruntime.thread", "threads"]),
        ("model=tiny-lama", ["model", "tiny-llama"]),
        ("compile.onnxruntime.threads=abc", ["compile.onnxruntime.threads", "abc"]),
        ("compile.onnxruntime.threads=-1", ["compile.onnxruntime.threads", "-1"]),
        ("compile.num_cores=4", ["compile.num_cores: moved", "compile.qaic.num_cores", "compile.onnxruntime.threads"]),
        ("seq.lengths=[512]", ["seq.lengths", "512"]),
    ],
)
def test_bad_overrides_fail_cleanly_and_write_nothing(tmp_path: Path, override: str, expected: list[str]) -> None:
    proc = run_qbuild(str(TINY), override, cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("qbuild: error:")
    for word in expected:
        assert word in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_missing_model_fails_cleanly(tmp_path: Path, write_manifest) -> None:
    m = write_manifest({"defaults": ["_self_"], "compile": {"onnxruntime": {"threads": 1}}})
    proc = run_qbuild(str(m), cache=tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model" in proc.stderr and not (tmp_path / "cache").exists()
    missing = run_qbuild(str(tmp_path / "nope.yaml"), cache=tmp_path / "cache")
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_missing_local_model_dir_is_a_plan_error(tmp_path: Path, write_manifest) -> None:
    m = write_manifest({"defaults": ["_self_"], "model": {"path": str(tmp_path / "absent")}})
    proc = run_qbuild(str(m), cache=tmp_path / "cache")
    assert proc.returncode == 3 and "model.path" in proc.stderr and "Traceback" not in proc.stderr
    hub = write_manifest({"defaults": ["_self_"], "model": {"name": "meta-llama/Llama-3.2-1B"}}, "hub.yaml")
    proc = run_qbuild(str(hub), cache=tmp_path / "cache", env={"HF_HUB_CACHE": str(tmp_path / "hf")})
    assert proc.returncode == 3
    assert "meta-llama/Llama-3.2-1B" in proc.stderr and "model.path" in proc.stderr


def test_hub_id_resolves_from_the_local_hub_cache(tmp_path: Path, write_manifest) -> None:
    from qbuild.models.source import init_random

    hub = tmp_path / "hf"
    repo = hub / "models--acme--tiny"
    init_random("llama", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 128}, 0,
                "float32", repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    m = write_manifest({"defaults": ["_self_"], "model": {"name": "acme/tiny"}, "verify": {"enabled": False}})
    env = {"HF_HUB_CACHE": str(hub)}
    proc = run_qbuild(str(m), "--json", cache=tmp_path / "cache", env=env, check=True)
    assert [s["state"] for s in json_lines(proc.stdout)[-1]["stages"]] == ["built"] * 3
    other = run_qbuild("plan", str(m), "model.revision=v2", cache=tmp_path / "cache", env=env)
    assert other.returncode == 3 and "acme/tiny" in other.stderr and "revision v2" in other.stderr

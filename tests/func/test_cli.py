"""The command line: --cfg, --json errors, verify failures, concurrent builders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qbuild.api import plan
from tests.conftest import ROOT, TINY, json_lines, run_qbuild

pytestmark = pytest.mark.slow


def test_cfg_prints_the_resolved_configuration(tmp_path: Path) -> None:
    proc = run_qbuild(str(TINY), "compile.onnxruntime.threads=3", "--cfg", cache=tmp_path / "c", check=True)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["compile"]["onnxruntime"]["threads"] == 3
    assert cfg["model"]["architecture"] == "llama"
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("args", [[str(TINY), "compile.num_cores=4"], ["plan", str(TINY), "compile.num_cores=4"],
                                  [str(TINY), "compile.num_cores=4", "--cfg"]])
def test_a_moved_key_names_its_new_place(tmp_path: Path, args: list[str]) -> None:
    proc = run_qbuild(*args, cache=tmp_path / "c")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("compile.num_cores: moved; use compile.qaic.num_cores (Cloud AI 100 NSP cores) or "
            "compile.onnxruntime.threads (ONNX Runtime threads)") in proc.stderr
    assert not (tmp_path / "c").exists()


def test_verify_mismatch_fails_and_publishes_no_verify_entry(tiny_cache: Path) -> None:
    proc = run_qbuild(str(TINY), "verify.atol=1e-9", "--json", cache=tiny_cache)
    assert proc.returncode == 7, proc.stderr
    assert "Traceback" not in proc.stderr and "max abs diff" in proc.stderr.lower()
    events = json_lines(proc.stdout)
    assert events[-1]["event"] == "error" and events[-1]["error"] == "VerifyError"
    assert any(e["event"] == "stage_failed" and e["stage"] == "verify" for e in events)
    p = plan(TINY, ["verify.atol=1e-9"], cache_dir=tiny_cache)
    assert [s.state for s in p.stages] == ["cached"] * 3 + ["build"]
    assert not list((tiny_cache / "staging").iterdir())
    full = run_qbuild(str(TINY), "verify.atol=1e-9", cache=tiny_cache, env={"QBUILD_FULL_ERROR": "1"})
    assert full.returncode == 7 and "Traceback" in full.stderr


def test_concurrent_builders_build_each_stage_once(tmp_path: Path) -> None:
    env = {**os.environ, "QBUILD_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-m", "qbuild", str(TINY), "--json"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    summaries = [json_lines(out)[-1]["stages"] for out, _ in outs]
    for i in range(4):
        states = sorted(s[i]["state"] for s in summaries)
        assert states.count("built") == 1, (i, states)
    assert len(list((tmp_path / "cache" / "objects").rglob("record.json"))) == 4


def test_python_m_and_console_script_agree(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "qbuild"
    a = subprocess.run([str(script), "plan", str(TINY), "--json"], capture_output=True, text=True,
                       env={**os.environ, "QBUILD_CACHE": str(tmp_path)}, check=True)
    b = run_qbuild("plan", str(TINY), "--json", cache=tmp_path, check=True)
    assert a.stdout == b.stdout


def test_options_may_stand_between_overrides(tmp_path: Path) -> None:
    proc = run_qbuild("plan", "--json", str(TINY), "--cache-dir", str(tmp_path), "compile.onnxruntime.threads=1",
                      "verify.seq_len=8", check=True)
    out = json_lines(proc.stdout)[-1]
    assert out["stages"][3]["state"] == "build" and out["stages"][0]["reasons"] == ["no record"]
    assert plan(TINY, ["compile.onnxruntime.threads=1", "verify.seq_len=8"], cache_dir=tmp_path).stage(
        "verify").key == out["stages"][3]["key"]


def test_plan_explain_prints_the_exact_qaic_command(tmp_path: Path) -> None:
    sdk = ROOT / "tests" / "fixtures" / "fake-sdk"
    kv = ROOT / "manifests" / "tiny-llama-kv.yaml"
    common = ["compile.backend=qaic", f"compile.qaic.sdk_dir={sdk}", "compile.qaic.mxfp6_matmul=true"]
    before = run_qbuild("plan", str(kv), *common, "--explain", cache=tmp_path, check=True)
    assert "-aic-hw" in before.stdout and "-mxfp6-matmul" in before.stdout and "-m=<onnx>" in before.stdout
    run_qbuild(str(kv), *common, cache=tmp_path, check=True)  # export and (fake) compile
    after = run_qbuild("plan", str(kv), *common, "--explain", "--json", cache=tmp_path, check=True)
    command = next(line for line in json.loads(after.stdout)["explain"] if line.startswith("command: "))
    assert command.startswith("command: ") and f"-m={tmp_path}" in command and "-retained-state" in command

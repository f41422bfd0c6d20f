"""The qaic backend through the real engine: a real export of the tiny Llama, the stand-in compiler.

The SDK cannot be installed here, so tests/fixtures/fake-qaic-compile (reached through the fake SDK
tree tests/fixtures/fake-sdk, or directly through compile.qaic.compiler) checks the command and
writes a placeholder QPC, or fails / hangs on request. Device tests (qaicrt) skip without the SDK.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbuild.api import build, plan
from qbuild.errors import CompileError, PlanError
from tests.conftest import ROOT, TINY, run_qbuild

pytestmark = pytest.mark.slow
FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-sdk"
FAKE_COMPILER = ROOT / "tests" / "fixtures" / "fake-qaic-compile"
QAIC = ["compile.backend=qaic"]


@pytest.fixture
def sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the fake SDK as $QAIC_SDK_DIR; the stand-in logs every call to ``calls.jsonl``."""
    root = tmp_path / "qti-aic"
    shutil.copytree(FAKE_SDK, root)  # follows the exec/qaic-compile link: a private, editable compiler
    monkeypatch.setenv("QAIC_SDK_DIR", str(root))
    monkeypatch.setenv("FAKE_QAIC_LOG", str(tmp_path / "calls.jsonl"))
    for var in ("FAKE_QAIC_MODE", "FAKE_QAIC_REJECT_NAMED", "FAKE_QAIC_PIDFILE"):
        monkeypatch.delenv(var, raising=False)
    return root


def calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def states(p) -> dict[str, str]:
    return {s.name: s.state for s in p.stages}


def compile_entries(cache: Path) -> list[Path]:
    return sorted((cache / "objects" / "compile").glob("*/record.json"))


def test_plan_without_the_sdk_auto_picks_onnxruntime_and_qaic_fails_clearly(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAIC_SDK_DIR", str(tmp_path / "no-sdk"))
    p = plan(TINY, ["compile.backend=auto"], cache_dir=tmp_path / "cache")
    assert p.notes[0] == (f"compile.backend: auto -> onnxruntime (no Cloud AI 100 compiler found; looked for "
                          f"{tmp_path}/no-sdk/exec/qaic-compile and {tmp_path}/no-sdk/exec/qaic-exec ($QAIC_SDK_DIR))")
    assert p.stage("compile").stage.backend.name == "onnxruntime"
    with pytest.raises(PlanError) as info:
        plan(TINY, QAIC, cache_dir=tmp_path / "cache")
    text = str(info.value)
    assert "compile.backend: qaic needs the Cloud AI 100 SDK" in text
    assert f"{tmp_path}/no-sdk/exec/qaic-compile" in text and "compile=onnxruntime" in text


def test_auto_picks_qaic_where_the_sdk_is(sdk: Path, tmp_path: Path) -> None:
    p = plan(TINY, ["compile.backend=auto"], cache_dir=tmp_path / "cache")
    assert p.notes[0] == (f"compile.backend: auto -> qaic (Cloud AI 100 compiler found: qaic-compile at "
                          f"{sdk}/exec/qaic-compile (Apps SDK 1.21.2.0, Platform SDK 1.21.2.0))")
    assert p.notes[1] == (f"verify: skipped, the qaic artifact cannot run on this machine (no Cloud AI 100 "
                          f"runtime (qaicrt) under {sdk})")
    assert [s.name for s in p.stages] == ["load", "export", "compile"]


def test_build_compiles_once_and_the_artifact_holds_qpc_side_files_and_command(sdk: Path, tiny_cache: Path,
                                                                                tmp_path: Path) -> None:
    r = build(TINY, QAIC, cache_dir=tiny_cache)
    assert [s["state"] for s in r.stages] == ["cached", "cached", "built"]
    out = Path(r.artifacts["compiled"])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "artifact.json", "command.json", "command.txt", "compile.log", "qpc/programqpc.bin", "specializations.json"]
    (argv,) = calls(tmp_path)
    onnx = Path(r.artifacts["onnx"])
    assert argv[:4] == ["-aic-hw", "-aic-hw-version=ai100", f"-m={onnx}", "-convert-to-fp16"]
    record = json.loads((out / "command.json").read_text())
    assert record["argv"] == [f"{sdk}/exec/qaic-compile", "-aic-hw", "-aic-hw-version=ai100", "-m=<onnx>",
                              "-convert-to-fp16", "-aic-num-cores=16",
                              "-network-specialization-config=<out>/specializations.json",
                              "-aic-binary-dir=<out>/qpc"]
    assert record["placeholders"]["<onnx>"] == str(onnx) and record["ran"][1:] == argv
    assert "Compilation complete" in (out / "compile.log").read_text()
    assert json.loads((out / "specializations.json").read_text()) == {
        "specializations": [{"name": "Seq_32", "symbols": {"batch": "1", "seq": "32"}}]}
    again = build(TINY, QAIC, cache_dir=tiny_cache)
    assert [s["state"] for s in again.stages] == ["cached"] * 3 and len(calls(tmp_path)) == 1


def test_a_kv_cache_build_writes_the_golden_side_files_from_the_real_graph(sdk: Path, tmp_path: Path) -> None:
    """The real retained-state export of the 2-layer tiny Llama, two prefill buckets: the files the backend
    derives from the ONNX graph equal the hand-written golden files of that case."""
    golden = ROOT / "tests" / "golden" / "qaic" / "causal_lm_2_prefill"
    r = build(TINY, [*QAIC, "transforms.apply=[kv_cache]", "seq.lengths=[32,64]", "seq.ctx_len=128",
                     "compile.qaic.num_cores=16"], cache_dir=tmp_path / "cache")
    out = Path(r.artifacts["compiled"])
    for name in ("specializations.json", "custom_io.yaml"):
        assert (out / name).read_text() == (golden / name).read_text(), name
    argv = json.loads((out / "command.json").read_text())["argv"]
    assert argv[1:] == (golden / "command.txt").read_text().splitlines()[1:]


@pytest.mark.parametrize(("override", "reason"), [
    ("compile.qaic.num_cores=4", "compile.qaic.num_cores: 16 -> 4"),
    ("compile.qaic.mxfp6_matmul=true", "compile.qaic.mxfp6_matmul: false -> true"),
    ("compile.qaic.num_devices=2", "compile.qaic.num_devices: 1 -> 2"),
    ("compile.qaic.mos=2", "compile.qaic.mos: null -> 2"),
    ("compile.qaic.aic_enable_depth_first=true", "compile.qaic.aic_enable_depth_first: false -> true"),
    ("compile.qaic.ols=2", "compile.qaic.ols: null -> 2"),
    ("compile.qaic.aic_hw_version=ai200", "compile.qaic.aic_hw_version: null -> ai200"),
    ("compile.qaic.convert_to_fp16=false", "compile.qaic.convert_to_fp16: true -> false"),
    ("compile.qaic.specializations_format=flat", "compile.qaic.specializations_format: auto -> flat"),
    ("compile.qaic.extra_flags.aic-perf-metrics=true",
     'compile.qaic.extra_flags: {} -> {"aic-perf-metrics": true}'),
])
def test_changing_a_flag_recompiles_only_compile(sdk: Path, tiny_cache: Path, override: str, reason: str) -> None:
    build(TINY, QAIC, cache_dir=tiny_cache)
    p = plan(TINY, [*QAIC, override], cache_dir=tiny_cache)
    assert states(p) == {"load": "cached", "export": "cached", "compile": "build"}
    assert p.stage("compile").reasons == [reason]


def test_an_sdk_upgrade_recompiles_and_the_timeout_or_sdk_location_do_not(sdk: Path, tiny_cache: Path,
                                                                          tmp_path: Path) -> None:
    build(TINY, QAIC, cache_dir=tiny_cache)
    moved = tmp_path / "elsewhere"
    shutil.copytree(sdk, moved)
    p = plan(TINY, [*QAIC, "compile.qaic.timeout_s=5", f"compile.qaic.sdk_dir={moved}"], cache_dir=tiny_cache)
    assert states(p)["compile"] == "cached"
    for name in ("apps.xml", "platform.xml"):
        f = sdk / "versions" / name
        f.write_text(f.read_text().replace("1.21.2.0", "1.22.0.3"))
    # the SDK is found once per process: a new process sees the upgrade
    out = json.loads(run_qbuild("plan", str(TINY), *QAIC, "--json", cache=tiny_cache, check=True).stdout)
    assert [(s["name"], s["state"]) for s in out["stages"]] == [("load", "cached"), ("export", "cached"),
                                                                ("compile", "build")]
    assert out["stages"][2]["reasons"] == ["qaic-apps-sdk 1.21.2.0 -> 1.22.0.3",
                                           "qaic-platform-sdk 1.21.2.0 -> 1.22.0.3"]


def test_a_compiler_failure_publishes_nothing_and_shows_command_and_output(sdk: Path, tiny_cache: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QAIC_MODE", "fail")
    before = compile_entries(tiny_cache)
    with pytest.raises(CompileError) as info:
        build(TINY, QAIC, cache_dir=tiny_cache)
    err = info.value
    assert err.returncode == 3 and err.command and err.command[0] == f"{sdk}/exec/qaic-compile"
    assert "-aic-hw-version=ai100" in err.command
    assert "unsupported layout" in err.output_tail and "compilation failed" in err.output_tail
    text = str(err)
    assert "exit code: 3" in text and "command: " in text and "full compiler log: " in text
    log = Path(text.split("full compiler log: ")[1].split(";")[0].strip())
    assert "unsupported layout" in log.read_text()
    assert compile_entries(tiny_cache) == before and not list((tiny_cache / "staging").iterdir())


def test_a_qpc_missing_after_exit_0_is_a_failure(sdk: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QAIC_MODE", "nobinary")
    with pytest.raises(CompileError, match="exited 0 but wrote no qpc/programqpc.bin"):
        build(TINY, QAIC, cache_dir=tiny_cache)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_hang_hits_the_timeout_and_the_compiler_is_killed(sdk: Path, tiny_cache: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QAIC_MODE", "hang")
    monkeypatch.setenv("FAKE_QAIC_PIDFILE", str(tmp_path / "pid"))
    t0 = time.monotonic()
    with pytest.raises(CompileError, match=r"ran past compile.qaic.timeout_s=2 s") as info:
        build(TINY, [*QAIC, "compile.qaic.timeout_s=2"], cache_dir=tiny_cache)
    assert time.monotonic() - t0 < 30
    assert "[fake] hanging" in info.value.output_tail
    assert _gone(int((tmp_path / "pid").read_text())) and not compile_entries(tiny_cache)[4:]


def test_ctrl_c_kills_the_compiler_and_publishes_nothing(sdk: Path, tiny_cache: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    env = {**os.environ, "QBUILD_CACHE": str(tiny_cache), "FAKE_QAIC_MODE": "hang", "FAKE_QAIC_PIDFILE": str(pidfile)}
    before = compile_entries(tiny_cache)
    proc = subprocess.Popen([sys.executable, "-m", "qbuild", str(TINY), *QAIC], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not pidfile.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert pidfile.exists(), proc.communicate()
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert _gone(int(pidfile.read_text()))
    assert compile_entries(tiny_cache) == before and not list((tiny_cache / "staging").iterdir())


def test_an_older_sdk_rejecting_named_specializations_builds_with_the_flat_format(
        sdk: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QAIC_REJECT_NAMED", "1")
    with pytest.raises(CompileError, match="exit code 1") as info:
        build(TINY, QAIC, cache_dir=tiny_cache)
    assert "type must be string, but is object" in info.value.output_tail
    r = build(TINY, [*QAIC, "compile.qaic.specializations_format=flat"], cache_dir=tiny_cache)
    spec = json.loads((Path(r.artifacts["compiled"]) / "specializations.json").read_text())
    assert spec == {"specializations": [{"batch": "1", "seq": "32"}]}


def test_an_explicit_compiler_without_version_files_is_keyed_by_its_digest(tiny_cache: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAIC_SDK_DIR", str(tmp_path / "no-sdk"))
    compiler = tmp_path / "bin" / "qaic-compile"
    compiler.parent.mkdir()
    shutil.copy(FAKE_COMPILER, compiler)
    r = build(TINY, [*QAIC, f"compile.qaic.compiler={compiler}"], cache_dir=tiny_cache)
    assert r.stages[-1]["state"] == "built"
    compiler.write_text(compiler.read_text() + "\n# a new compiler build\n")
    p = plan(TINY, [*QAIC, f"compile.qaic.compiler={compiler}"], cache_dir=tiny_cache)
    assert states(p)["compile"] == "build" and p.stage("compile").reasons[0].startswith("qaic-compiler-sha256 ")


def test_explain_and_plan_command_give_the_exact_command(sdk: Path, tiny_cache: Path) -> None:
    from qbuild.backends.qaic import QaicBackend
    from qbuild.manifest import compose
    from qbuild.store import Store
    from qbuild.tasks import task_for

    m = compose(TINY, [*QAIC, "compile.qaic.mos=2"]).manifest
    backend, task = QaicBackend(), task_for(m)
    params = backend.resolve(m, task, Store(tiny_cache, readonly=True).stats)
    lines = backend.describe(params)
    assert lines[1] == (f"  {sdk}/exec/qaic-compile -aic-hw -aic-hw-version=ai100 '-m=<onnx>' -convert-to-fp16 "
                        "-aic-num-cores=16 -mos=2 '-network-specialization-config=<out>/specializations.json' "
                        "'-aic-binary-dir=<out>/qpc'")
    r = build(TINY, [*QAIC, "compile.qaic.mos=2"], cache_dir=tiny_cache)
    onnx = Path(r.artifacts["onnx"])
    assert backend.command(params, onnx) == [
        f"{sdk}/exec/qaic-compile", "-aic-hw", "-aic-hw-version=ai100", f"-m={onnx}", "-convert-to-fp16",
        "-aic-num-cores=16", "-mos=2", "-network-specialization-config=<out>/specializations.json",
        "-aic-binary-dir=<out>/qpc"]
    assert json.loads((Path(r.artifacts["compiled"]) / "command.json").read_text())["argv"][1:] == [
        a.replace(str(onnx), "<onnx>") for a in backend.command(params, onnx)[1:]]
    assert backend.describe(params, onnx)[1] == "command: " + shlex.join(backend.command(params, onnx))


@pytest.mark.device
def test_device_runs_an_embedding_or_kv_qpc() -> None:
    from qbuild.runtime.qaic import qaicrt_available

    if not qaicrt_available():
        pytest.skip("the Cloud AI 100 runtime (qaicrt) is not installed")
    pytest.skip("needs a real QPC from the SDK; run `qbuild <manifest> compile=qaic` on a Cloud AI 100 host")


def test_embedding_qpc_goes_to_the_device_runtime(tmp_path: Path) -> None:
    """An embedding QPC opens through qaicrt (absent here: a clear RunError), and `qbuild embed` says so first."""
    from qbuild.errors import RunError
    from qbuild.runtime.embed import Embedder

    manifest = ROOT / "manifests" / "tiny-bert.yaml"
    qaic = ["compile.backend=qaic", f"compile.qaic.sdk_dir={FAKE_SDK}"]
    result = build(manifest, qaic, cache_dir=tmp_path / "cache")
    compiled = Path(result.artifacts["compiled"])
    assert (compiled / "qpc").is_dir() and (compiled / "specializations.json").is_file()
    with pytest.raises(RunError, match="cannot import the Cloud AI 100 runtime"):
        Embedder(compiled, Path(result.tokenizer_dir or ""))
    proc = subprocess.run([sys.executable, "-m", "qbuild", "embed", str(manifest), *qaic, "--text", "hi"],
                          capture_output=True, text=True, env={**os.environ, "QBUILD_CACHE": str(tmp_path / "c2")})
    assert proc.returncode == 9 and "cannot execute a qaic artifact" in proc.stderr  # CannotExecute, a RunError

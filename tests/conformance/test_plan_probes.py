"""What ``qbuild plan`` runs besides Python: nothing for ONNX Runtime, and for qaic only the SDK's hardware
probe (``<sdk>/tools/qaic-util -q``), at most once per process.

Each check runs qbuild in a fresh process: the probe is memoised per process, and the process-start
functions are patched before qbuild is imported, so nothing started at import time escapes the count.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qbuild.api import build
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-sdk"
LLAMA = ROOT / "manifests" / "tiny-llama.yaml"
LLAMA_KV = ROOT / "manifests" / "tiny-llama-kv.yaml"
NO_VERIFY = "verify.enabled=false"

#: argv: out-file, mode ("refuse": every process start raises; "record": Popen runs, argv[0] recorded),
#: then one JSON list of qbuild CLI argument lists to run in this process, in order
_PROBE = r'''
import json, os, sys
import subprocess, _posixsubprocess

out, mode, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
started = []      # argv[0] of each subprocess.Popen
other = []        # process starts outside subprocess.Popen
inside = [0]

def refuse(name):
    def refused(*args, **kwargs):
        other.append(name)
        raise RuntimeError(f"qbuild plan started a process: {name}")
    return refused

real_init, real_fork_exec = subprocess.Popen.__init__, _posixsubprocess.fork_exec

def popen_init(self, args, *rest, **kwargs):
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    started.append(os.fsdecode(argv[0]))
    if mode == "refuse":
        raise RuntimeError(f"qbuild plan started a process: {argv!r}")
    inside[0] += 1
    try:
        return real_init(self, args, *rest, **kwargs)
    finally:
        inside[0] -= 1

def fork_exec(*args, **kwargs):
    if not inside[0]:
        other.append("_posixsubprocess.fork_exec")
        raise RuntimeError("qbuild plan started a process outside subprocess.Popen")
    return real_fork_exec(*args, **kwargs)

subprocess.Popen.__init__ = popen_init
_posixsubprocess.fork_exec = fork_exec
for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "popen", "execv", "execve", "execvp",
             "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
    if hasattr(os, name):
        setattr(os, name, refuse("os." + name))

from qbuild.cli import main

codes = [main(args) for args in runs]
with open(out, "w") as f:
    json.dump({"codes": codes, "started": started, "other": other}, f)
print(json.dumps({"count": len(started) + len(other)}))
'''


def _probe(tmp_path: Path, mode: str, runs: list[list[str]], env: dict[str, str]) -> dict[str, Any]:
    """Run ``qbuild.cli.main(args)`` for each of ``runs`` in one fresh, instrumented Python process."""
    out = tmp_path / f"probe-{len(list(tmp_path.glob('probe-*')))}.json"
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(out), mode, json.dumps(runs)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0 and out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    result["stdout"] = proc.stdout
    result["count"] = json.loads(proc.stdout.strip().splitlines()[-1])["count"]
    return result


def _plan_json(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"name"')]


# --- (a) ONNX Runtime: plan starts no process ------------------------------------------------------------


@pytest.fixture(scope="module")
def warm_ort_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama and tiny-llama-kv built (ONNX Runtime, no verify): plan then reads entries and digests."""
    cache = tmp_path_factory.mktemp("probes-ort") / "cache"
    for manifest in (LLAMA, LLAMA_KV):
        build(manifest, [NO_VERIFY], cache_dir=cache)
    return cache


@pytest.mark.parametrize("warm", [False, True], ids=["cold-cache", "warm-cache"])
def test_plan_on_onnxruntime_starts_no_process(warm: bool, warm_ort_cache: Path, tmp_path: Path) -> None:
    cache = warm_ort_cache if warm else tmp_path / "cold"
    overrides = ["compile.backend=onnxruntime", NO_VERIFY]
    runs = [["plan", str(m), *overrides, "--cache-dir", str(cache), *flags]
            for m in (LLAMA, LLAMA_KV) for flags in ([], ["--explain", "--json"])]
    env = {"QAIC_SDK_DIR": str(tmp_path / "no-sdk")}  # nothing to find even if something looked
    result = _probe(tmp_path, "refuse", runs, env)
    assert result["codes"] == [0] * len(runs), result["stdout"]
    assert result["count"] == 0 and result["started"] == [] and result["other"] == []
    plans = _plan_json(result["stdout"])
    assert len(plans) == 2 and all(p["explain"] for p in plans)
    states = {s["state"] for p in plans for s in p["stages"]}
    assert states == ({"cached"} if warm else {"build"})


# --- (b) qaic: the SDK probe at most once per process, and nothing else --------------------------------


@pytest.fixture
def probed_sdk(tmp_path: Path) -> tuple[Path, Path]:
    """A private fake SDK whose ``tools/qaic-util`` logs "<parent pid> <args>" per run and reports no card."""
    sdk = tmp_path / "qti-aic"
    shutil.copytree(FAKE_SDK, sdk)  # follows exec/qaic-compile's link
    log = tmp_path / "qaic-util.log"
    util = sdk / "tools" / "qaic-util"
    util.unlink()
    util.write_text(f'#!/bin/sh\necho "$PPID $*" >> {shlex.quote(str(log))}\nexit 0\n')
    util.chmod(0o755)
    return sdk, log


def _log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _qbuild(*args: str, env: dict[str, str]) -> tuple[int, subprocess.CompletedProcess[str]]:
    """The CLI in a fresh process: (its pid, the finished process)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_QAIC_")}  # the stand-in compiles
    proc = subprocess.Popen([sys.executable, "-m", "qbuild", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**full, **env})
    stdout, stderr = proc.communicate(timeout=300)
    return proc.pid, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_the_qaic_sdk_probe_runs_at_most_once_per_process(probed_sdk: tuple[Path, Path], tmp_path: Path) -> None:
    sdk, log = probed_sdk
    cache = tmp_path / "cache"
    env = {"QAIC_SDK_DIR": str(sdk), "QBUILD_CACHE": str(cache)}
    qaic = ["compile.backend=qaic"]
    steps = [
        ("plan, cold cache", ["plan", str(LLAMA_KV), *qaic, "--explain"]),
        ("build", [str(LLAMA_KV), *qaic, NO_VERIFY]),
        ("plan, warm cache (explain reads the ONNX)", ["plan", str(LLAMA_KV), *qaic, NO_VERIFY, "--explain", "--json"]),
    ]
    per_process: dict[str, list[str]] = {}
    for what, args in steps:
        before = len(_log_lines(log))
        pid, proc = _qbuild(*args, env=env)
        assert proc.returncode == 0, f"{what}: {proc.stdout}\n{proc.stderr}"
        new = _log_lines(log)[before:]
        per_process[what] = new
        assert len(new) <= 1, f"{what}: qaic-util ran {len(new)} times in one process: {new}"
        assert all(line == f"{pid} -q" for line in new), (what, pid, new)
    assert sum(map(len, per_process.values())) >= 1, "the logging qaic-util never ran: the probe is not tested"
    (warm,) = _plan_json(proc.stdout)
    assert [(s["name"], s["state"]) for s in warm["stages"]] == [("load", "cached"), ("export", "cached"),
                                                                 ("compile", "cached")]
    assert any(line.startswith("command: ") for line in warm["explain"])


def test_plan_on_qaic_starts_only_the_probe(probed_sdk: tuple[Path, Path], tmp_path: Path) -> None:
    """Two plans (and their --explain) in one process: the probe once at most, no other process."""
    sdk, log = probed_sdk
    cache = tmp_path / "cache"
    runs = [["plan", str(m), "compile.backend=qaic", "--explain", "--cache-dir", str(cache)] for m in (LLAMA_KV, LLAMA)]
    result = _probe(tmp_path, "record", runs, {"QAIC_SDK_DIR": str(sdk)})
    assert result["codes"] == [0, 0], result["stdout"]
    assert result["other"] == []
    assert result["started"] in ([], [str(sdk / "tools" / "qaic-util")]), result["started"]
    assert len(_log_lines(log)) == len(result["started"])
    assert "qaic: qaic-compile at" in result["stdout"]  # the plans did resolve the qaic backend

"""The command line a person expects: usage, --version, --help, options refused where they do nothing,
the full --cfg, quiet broken pipes, Ctrl-C reported as an interruption, control characters escaped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, run_qbuild

BERT = ROOT / "manifests" / "tiny-bert.yaml"


def test_no_arguments_version_and_help() -> None:
    bare = run_qbuild()
    assert bare.returncode == 2 and "name a manifest, e.g. qbuild manifests/tiny-llama.yaml" in bare.stderr
    assert "overrides" not in bare.stderr.splitlines()[-1]  # overrides are optional
    version = run_qbuild("--version", check=True)
    from qbuild import __version__

    assert version.stdout.strip() == f"qbuild {__version__}"
    helptext = run_qbuild("--help", check=True).stdout
    for word in ("plan", "run", "embed", "verify-bundle", "cache", "--prompt", "--text", "--file", "--cache",
                 "--out", "--remote", "--launcher", "--sweeper", "--explain", "--cfg", "--version"):
        assert word in helptext, word


@pytest.mark.parametrize(("args", "message"), [
    (["plan", str(TINY), "--prompt", "hi"], "--prompt is an option of qbuild run, not of qbuild plan"),
    (["embed", str(BERT), "--prompt", "hi"], "--prompt is an option of qbuild run, not of qbuild embed"),
    ([str(TINY), "--explain"], "--explain is an option of qbuild plan, not of qbuild build"),
    (["run", str(TINY), "--text", "x"], "--text is an option of qbuild embed"),
    ([str(TINY), "--launcher", "ray"], "--launcher is an option of a sweep"),
    ([str(TINY), "--measure"], "--measure is an option of a sweep"),
    ([str(TINY), "hydra.run.dir=/tmp/elsewhere"], "hydra.run.dir: Hydra's own settings do nothing in a build"),
    (["plan", str(TINY), "hydra.verbose=true"], "hydra.verbose: Hydra's own settings do nothing in a build"),
])
def test_an_option_the_command_would_ignore_is_refused(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_qbuild(*args, cache=tmp_path / "cache")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_cfg_prints_the_full_configuration_with_defaults_and_as_json() -> None:
    text = run_qbuild(str(TINY), "compile.onnxruntime.threads=1", "--cfg", check=True).stdout
    for line in ("threads: 1", "export:", "opset:", "verify:", "atol:", "qaic:", "num_cores:"):
        assert line in text, line
    data = json.loads(run_qbuild(str(TINY), "--cfg", "--json", check=True).stdout)
    assert data["compile"]["onnxruntime"]["threads"] == 2 and data["export"]["opset"] >= 17
    assert data["model"]["config"]["hidden_size"] == 64 and "enabled" in data["verify"]


def test_output_piped_into_head_ends_quietly(tiny_cache: Path, tmp_path: Path) -> None:
    env = {**os.environ, "QBUILD_CACHE": str(tiny_cache)}  # a private copy: the shared warm cache stays as built
    cmd = f"{sys.executable} -m qbuild {TINY} --json | head -1; echo rc=${{PIPESTATUS[0]}} >&2"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
    assert json.loads(proc.stdout)["event"] == "plan"
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"text number {i}\n" for i in range(400)))
    cmd = (f"{sys.executable} -m qbuild embed {BERT} --file {texts} --cache-dir {tmp_path / 'c'} | head -1; "
           "echo rc=${PIPESTATUS[0]} >&2")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.stdout.count("\n") == 1
    assert proc.stderr.strip().splitlines()[-1] in ("rc=141", "rc=0")  # 141 = 128 + SIGPIPE


def test_ctrl_c_is_an_interruption_not_a_failure(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "qbuild", str(TINY), "--json", "--cache-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"stage_started"' in line and '"export"' in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    events = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert proc.returncode == 130 and "interrupted" in err
    assert not [e for e in events if e["event"] == "stage_failed"]
    assert [e["stage"] for e in events if e["event"] == "stage_interrupted"] == ["export"]
    assert not list((tmp_path / "objects").glob("export/*"))  # nothing partial published


def test_a_name_with_control_characters_slashes_or_20k_characters_is_refused(tmp_path: Path) -> None:
    for bad, message in (('"tiny\\e[31mred\\a"', "name: \\x07, \\x1b cannot be part of a name"),
                         ('"a/b"', "name: / cannot be part of a name"),
                         ("x" * 20000, "name: 20,000 characters; a name has at most 200")):
        m = tmp_path / "m.yaml"
        m.write_text(TINY.read_text().replace("name: tiny-llama", f"name: {bad}"))
        proc = run_qbuild("plan", str(m), cache=tmp_path / "cache")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "\x1b" not in proc.stderr and len(proc.stderr) < 1000


def test_control_characters_in_a_manifest_path_are_shown_escaped(tmp_path: Path) -> None:
    d = tmp_path / "odd\x1bdir"
    d.mkdir()
    m = d / "m.yaml"
    m.write_text(TINY.read_text())
    proc = run_qbuild("plan", str(m), cache=tmp_path / "cache", check=True)
    assert "\x1b" not in proc.stdout and "odd\\x1bdir" in proc.stdout


def test_run_on_an_embedding_model_points_to_embed(tmp_path: Path) -> None:
    proc = run_qbuild("run", str(BERT), "--prompt", "hi", cache=tmp_path / "cache")
    assert proc.returncode == 9 and "use qbuild embed" in proc.stderr and "kv_cache" not in proc.stderr
    lm = run_qbuild("run", str(TINY), "--prompt", "hi", cache=tmp_path / "cache")
    assert lm.returncode == 9 and "add transforms=kv_cache" in lm.stderr

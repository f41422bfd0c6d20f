"""Sweeps: Hydra's sweeper and launchers over qbuild builds sharing one cache (real Hydra, real processes)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

KV = ROOT / "manifests" / "tiny-llama-kv.yaml"
FAST = ["verify.max_new_tokens=4", "seq.ctx_len=64"]


def qbuild(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qbuild", *args, "--cache-dir", str(cache)], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def records(cache: Path, stage: str) -> list[Path]:
    return sorted((cache / "objects" / stage).glob("*/record.json"))


def test_a_2x2_sweep_builds_one_export_and_is_fully_cached_the_second_time(tmp_path: Path) -> None:
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    args = [str(KV), "-m", "compile.onnxruntime.threads=1,2", "seq.lengths=[16],[16,32]", *FAST,
            "--jobs", "2", "--json"]
    first = qbuild(*args, cwd=work, cache=cache)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout.splitlines()[-1])
    assert out["jobs"] == 4 and out["failed"] == 0
    combos = {tuple(r["overrides"][:2]) for r in out["rows"]}
    assert combos == {(f"compile.onnxruntime.threads={t}", f"seq.lengths={s}")
                      for t in (1, 2) for s in ("[16]", "[16,32]")}
    assert len(records(cache, "load")) == 1 and len(records(cache, "export")) == 1  # single-flight
    assert len(records(cache, "compile")) == 4 and len(records(cache, "verify")) == 4
    assert sum(r["stages"]["export"] == "built" for r in out["rows"]) == 1
    assert all(r["verify"] == "passed" and r["artifact_bytes"] > 0 for r in out["rows"])
    assert sorted(p.name for p in work.iterdir()) == []  # no outputs/ or multirun/ in the working directory
    table = Path(out["sweep_dir"]) / "results.csv"
    with open(table, newline="") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["ok"] * 4
    again = json.loads(qbuild(*args, cwd=work, cache=cache).stdout.splitlines()[-1])
    assert all(set(r["stages"].values()) == {"cached"} for r in again["rows"])
    assert [r["keys"] for r in again["rows"]] == [r["keys"] for r in out["rows"]]


def test_failed_jobs_are_rows_and_fail_fast_stops(tmp_path: Path) -> None:
    """export.opset=13 is below the minimum: that job fails as a ManifestError row; the other builds."""
    cache = tmp_path / "cache"
    args = [str(KV), "-m", "export.opset=13,17", "verify.enabled=false", "--launcher", "basic"]
    proc = qbuild(*args, "--json", cwd=tmp_path, cache=cache)
    assert proc.returncode == 1
    rows = {r["overrides"][0]: r for r in json.loads(proc.stdout.splitlines()[-1])["rows"]}
    assert rows["export.opset=13"]["status"] == "failed"
    assert rows["export.opset=13"]["error_class"] == "ManifestError"
    assert "export.opset" in rows["export.opset=13"]["error"]
    assert rows["export.opset=17"]["status"] == "ok" and rows["export.opset=17"]["stages"]["compile"] == "built"
    text = qbuild(*args, cwd=tmp_path, cache=cache)
    assert "1 failed" in text.stdout and "ManifestError: export.opset" in text.stdout
    fast = qbuild(*args, "--fail-fast", "--sweep-dir", str(tmp_path / "ff"), cwd=tmp_path, cache=cache)
    assert fast.returncode == 1 and "Traceback" not in fast.stderr
    skipped = json.loads((tmp_path / "ff" / "1" / "qbuild.json").read_text())
    assert skipped["status"] == "skipped" and "stages" not in skipped  # the second job never built


def test_hydra_grammar_range_and_a_toml_manifest(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    toml = ROOT / "manifests" / "tiny-llama.toml"
    proc = qbuild(str(toml), "-m", "compile.onnxruntime.threads=range(1,4)", "verify.enabled=false",
                  "--launcher", "basic", "--sweep-dir", str(tmp_path / "s"), "--json", cwd=tmp_path, cache=cache)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.splitlines()[-1])["rows"]
    assert [r["overrides"][0] for r in rows] == [f"compile.onnxruntime.threads={n}" for n in (1, 2, 3)]
    assert len(records(cache, "export")) == 1 and len(records(cache, "compile")) == 3
    assert (tmp_path / "s" / "results.csv").is_file()


def test_a_bad_sweep_override_is_one_clear_error(tmp_path: Path) -> None:
    proc = qbuild(str(KV), "-m", "compile.onnxruntime.threads=1,2", "--launcher", "nope", cwd=tmp_path,
                  cache=tmp_path / "c")
    assert proc.returncode == 2 and "--launcher: unknown launcher 'nope'" in proc.stderr
    proc = qbuild("plan", str(KV), "-m", "compile.onnxruntime.threads=1,2", cwd=tmp_path, cache=tmp_path / "c")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("launcher", ["joblib", "basic"])
def test_sweep_api_returns_rows(tmp_path: Path, launcher: str) -> None:
    from qbuild.sweep import sweep

    result = sweep(KV, ["compile.onnxruntime.threads=1,2", "verify.enabled=false"], cache_dir=tmp_path,
                   launcher=launcher, jobs=2)
    assert [r["status"] for r in result.rows] == ["ok", "ok"]
    assert len(records(tmp_path, "export")) == 1


def test_the_sweep_runs_with_the_submitit_local_launcher(tmp_path: Path) -> None:
    """submitit (the SLURM launcher) in its local mode: jobs are separate submitit processes, same cache."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'qbuild[slurm]'")
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    proc = qbuild(str(KV), "-m", "compile.onnxruntime.threads=1,2", "seq.lengths=[16],[16,32]", *FAST,
                  "--launcher", "submitit_local", "--json", cwd=work, cache=cache)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert [r["status"] for r in out["rows"]] == ["ok"] * 4
    assert len({r["pid"] for r in out["rows"]}) == 4  # one submitit process per job
    assert len(records(cache, "export")) == 1 and len(records(cache, "compile")) == 4
    assert (Path(out["sweep_dir"]) / ".submitit").is_dir() and sorted(work.iterdir()) == []


@pytest.mark.parametrize(("manifest", "figure"), [(KV, "decode_tok_s"), (ROOT / "manifests" / "tiny-bert.yaml",
                                                                           "embed_per_s"),
                                                   (ROOT / "manifests" / "tiny-llama.yaml", None)])
def test_measure_times_a_fixed_run_on_each_artifact(tmp_path: Path, manifest: Path, figure: str | None) -> None:
    from qbuild.sweep import render, sweep

    result = sweep(manifest, ["compile.onnxruntime.session=fixed,dynamic", "verify.enabled=false"],
                   cache_dir=tmp_path, launcher="basic", measure=True)
    measures = [r["measure"] for r in result.rows]
    if figure is None:  # a causal LM without a KV cache has no runtime to time
        assert all("no measurement" in m["skipped"] for m in measures)
        return
    assert [m["figure"] for m in measures] == [figure, figure] and all(m["value"] > 0 for m in measures)
    assert figure in render(result)
    assert json.loads((result.sweep_dir / "results.json").read_text())["rows"][0]["measure"]["figure"] == figure
    pytest.importorskip("matplotlib", reason="pip install 'qbuild[plot]'")
    from PIL import Image

    with Image.open(result.sweep_dir / "results.png") as png:  # the chart of the measured figure
        assert png.format == "PNG" and png.size[0] >= 400

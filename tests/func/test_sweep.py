"""Sweeps: Hydra's sweeper and launchers over qbuild builds sharing one cache (real Hydra, real processes)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import KV, ROOT, copy_cache

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


def test_failed_jobs_are_rows_and_fail_fast_stops(tmp_path: Path, warm_kv_export: Path) -> None:
    """export.opset=13 is below the minimum: that job fails as a ManifestError row; the other builds."""
    cache = copy_cache(warm_kv_export, tmp_path / "cache")
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
def test_sweep_api_returns_rows(tmp_path: Path, launcher: str, warm_kv_export: Path) -> None:
    from qbuild.sweep import sweep

    cache = copy_cache(warm_kv_export, tmp_path / "cache")
    result = sweep(KV, ["compile.onnxruntime.threads=1,2", "verify.enabled=false"], cache_dir=cache,
                   launcher=launcher, jobs=2)
    assert [r["status"] for r in result.rows] == ["ok", "ok"]
    assert [r["stages"]["compile"] for r in result.rows] == ["built", "built"]
    assert len(records(cache, "export")) == 1


def test_the_sweep_runs_with_the_submitit_local_launcher(tmp_path: Path, warm_kv_export: Path) -> None:
    """submitit (the SLURM launcher) in its local mode: jobs are separate submitit processes, same cache."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'qbuild[slurm]'")
    cache, work = copy_cache(warm_kv_export, tmp_path / "cache"), tmp_path / "work"
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_sweep_runs_on_a_local_ray_head(tmp_path: Path, warm_kv_export: Path) -> None:
    """A Ray head started here (loopback only); the shipped qbuild_ray config joins it through $RAY_ADDRESS."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="pip install 'qbuild[ray]'")
    ray = Path(sys.executable).with_name("ray")
    port = _free_port()
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's single-machine mode, every address on loopback; the head and
    # the sweep share a token (Ray's token authentication), as the nodes of a real cluster would
    env = {"PATH": f"{ray.parent}:/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": uuid.uuid4().hex * 2}
    subprocess.run([str(ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=120)
    try:
        cache, work = copy_cache(warm_kv_export, tmp_path / "cache"), tmp_path / "work"
        work.mkdir()
        proc = subprocess.Popen([sys.executable, "-m", "qbuild", str(KV), "-m", "compile.onnxruntime.threads=1,2",
                                 "seq.lengths=[16],[16,32]", *FAST, "--launcher", "ray", "--json",
                                 "--cache-dir", str(cache)], cwd=work, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        out = json.loads(stdout.splitlines()[-1])
        assert [r["status"] for r in out["rows"]] == ["ok"] * 4
        assert proc.pid not in {r["pid"] for r in out["rows"]}  # built by Ray workers, not the sweeping process
        assert len(records(cache, "export")) == 1 and len(records(cache, "compile")) == 4
        assert sorted(work.iterdir()) == []
    finally:
        subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_the_optuna_sweeper_optimises_an_objective(tmp_path: Path, warm_kv_export: Path) -> None:
    """hydra-optuna-sweeper in place of the basic sweeper: each job returns its objective to Optuna."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install 'qbuild[optuna]'")
    import yaml

    cache = copy_cache(warm_kv_export, tmp_path / "cache")
    proc = qbuild(str(KV), "-m", "compile.onnxruntime.threads=choice(1,2)",
                  "compile.onnxruntime.session=choice(fixed,dynamic)", "seq.lengths=[16]", "seq.ctx_len=64",
                  "verify.enabled=false", "--sweeper", "optuna", "--objective", "decode_tok_s", "--trials", "3",
                  "--launcher", "basic", "--json", cwd=tmp_path, cache=cache)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    rows = out["rows"]
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    for r in rows:  # Optuna picked every value from the declared choices; each job measured its own artifact
        assert r["overrides"][0] in ("compile.onnxruntime.threads=1", "compile.onnxruntime.threads=2")
        assert r["overrides"][1] in ("compile.onnxruntime.session=fixed", "compile.onnxruntime.session=dynamic")
        assert r["measure"]["figure"] == "decode_tok_s" and r["objective"] == r["measure"]["value"] > 0
    best = max(rows, key=lambda r: r["objective"])
    assert out["objective"]["best_job"] == best["job"] and out["objective"]["direction"] == "maximize"
    optuna = yaml.safe_load((Path(out["sweep_dir"]) / "optimization_results.yaml").read_text())
    assert optuna["best_value"] == pytest.approx(best["objective"])  # Optuna saw the same values
    assert len(records(cache, "export")) == 1


def test_an_objective_without_optuna_ranks_the_jobs(tmp_path: Path, warm_kv_export: Path) -> None:
    from qbuild.sweep import render, sweep

    cache = copy_cache(warm_kv_export, tmp_path / "cache")
    result = sweep(KV, ["compile.onnxruntime.threads=1,2", "verify.enabled=false"], cache_dir=cache,
                   launcher="basic", objective="artifact_bytes")
    assert [r["objective"] for r in result.rows] == [float(r["artifact_bytes"]) for r in result.rows]
    assert result.best is not None and result.best["objective"] == min(r["objective"] for r in result.rows)
    assert f"best artifact_bytes (minimize): job {result.best['job']}" in render(result)


@pytest.mark.parametrize(("args", "message"), [
    (["--sweeper", "optuna"], "--sweeper optuna needs --objective"),
    (["--trials", "3"], "--trials N"),
    (["--objective", "speed"], "--objective: unknown figure 'speed'"),
    (["--sweeper", "grid"], "--sweeper: unknown sweeper 'grid'"),
])
def test_sweeper_options_are_checked(tmp_path: Path, args: list[str], message: str) -> None:
    proc = qbuild(str(KV), "-m", "compile.onnxruntime.threads=1,2", *args, cwd=tmp_path, cache=tmp_path / "c")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_launcher_plugin_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from qbuild import sweep as sw
    from qbuild.errors import ManifestError

    monkeypatch.setitem(sw.PLUGINS, "ray", ("hydra_plugins.not_installed_launcher", "ray"))
    with pytest.raises(ManifestError, match=r"pip install 'qbuild\[ray\]'"):
        sw._require_plugin("ray")


@pytest.mark.parametrize(("launcher", "target", "fields"), [
    ("qbuild_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
     {"timeout_min": 120, "cpus_per_task": 8, "partition": None}),
    ("qbuild_ray", "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher", {}),
])
def test_the_shipped_launcher_configs_compose(launcher: str, target: str, fields: dict) -> None:
    """The configs behind ``--launcher slurm`` / ``ray``, composed by Hydra as a sweep composes them."""
    pytest.importorskip(target.rsplit(".", 2)[0], reason="pip install 'qbuild[slurm]' / 'qbuild[ray]'")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "manifests"), version_base=None):
        cfg = compose("tiny-llama-kv", [f"hydra/launcher={launcher}"], return_hydra_config=True)
    conf = cfg.hydra.launcher
    assert conf._target_ == target
    for key, value in fields.items():
        assert conf[key] == value
    if launcher == "qbuild_ray":
        assert OmegaConf.to_container(conf.ray, resolve=True)["init"] == {"address": None,
                                                                          "object_store_memory": None}
        assert conf.ray.remote.num_cpus == 1


def test_sweep_jobs_push_to_the_remote_cache(tmp_path: Path) -> None:
    """--remote reaches every job: a second cache sweeping the same variants pulls every stage."""
    from qbuild.sweep import sweep

    remote = tmp_path / "remote"
    args = ["compile.onnxruntime.threads=1,2", "verify.enabled=false"]
    first = sweep(KV, args, cache_dir=tmp_path / "a", launcher="basic", remote=str(remote))
    assert [r["status"] for r in first.rows] == ["ok", "ok"]
    assert len(list(remote.glob("objects/compile/*/record.json"))) == 2
    second = sweep(KV, args, cache_dir=tmp_path / "b", launcher="basic", remote=str(remote))
    assert all(set(r["stages"].values()) == {"pulled"} or set(r["stages"].values()) == {"pulled", "cached"}
               for r in second.rows)
    assert [r["keys"] for r in second.rows] == [r["keys"] for r in first.rows]

"""The example CI workflow (examples/ci/build-artifacts.yml): its `run:` steps, run here in order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

WORKFLOW = ROOT / "examples" / "ci" / "build-artifacts.yml"
#: the repository the workflow runs in: two of our tiny manifests (quick: no verify of the LM's tokens)
MANIFESTS = {"tiny-llama.yaml": ["verify.enabled=false"], "tiny-bert.yaml": []}


def run_steps(workflow: dict, repo: Path) -> list[tuple[str, subprocess.CompletedProcess[str]]]:
    """Every step with `run:` in order, in bash with the job's env, as a runner would; the install step
    is skipped (this test runs in the environment where qbuild is installed)."""
    job = workflow["jobs"]["build"]
    env = {**os.environ, **{k: str(v) for k, v in workflow.get("env", {}).items()},
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = []
    for step in job["steps"]:
        if "run" not in step or step.get("id") == "install":
            continue
        proc = subprocess.run(["bash", "-eo", "pipefail", "-c", step["run"]], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"step {step['name']!r} failed:\n{proc.stdout}\n{proc.stderr}"
        done.append((step["name"], proc))
    return done


def test_the_example_workflow_steps_pass_and_a_second_run_is_cached(tmp_path: Path) -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = workflow["jobs"]["build"]["steps"]
    assert any(s.get("uses", "").startswith("actions/cache/restore") for s in steps)
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)
    repo = tmp_path / "repo"
    (repo / "manifests").mkdir(parents=True)
    for name, overrides in MANIFESTS.items():  # the same manifests, with the quick settings written in
        text = (ROOT / "manifests" / name).read_text()
        for o in overrides:
            key, value = o.split("=", 1)
            section, leaf = key.split(".")
            text += f"\n{section}:\n  {leaf}: {value}\n"
        (repo / "manifests" / name).write_text(text)
    first = dict(run_steps(workflow, repo))
    assert "tiny-llama" in first["Plan (what will be built, and why)"].stdout
    assert sorted(p.name for p in (repo / "dist").iterdir()) == ["tiny-bert", "tiny-llama"]
    assert "files match provenance.json" in first["Verify the bundles against their provenance"].stdout
    assert (repo / ".qbuild-cache" / "objects").is_dir()
    # the next CI run: the cache restored, dist/ fresh; nothing is rebuilt
    shutil.rmtree(repo / "dist")
    run_steps(workflow, repo)
    plan = subprocess.run([sys.executable, "-m", "qbuild", "plan", "manifests/", "--json"], cwd=repo,
                          capture_output=True, text=True, env={**os.environ, "QBUILD_CACHE": ".qbuild-cache"},
                          check=True)
    assert {s["state"] for p in json.loads(plan.stdout) for s in p["stages"]} == {"cached"}

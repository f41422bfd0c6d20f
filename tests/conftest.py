"""Shared fixtures: manifests written from dicts, a warm cache of the tiny Llama build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "manifests" / "tiny-llama.yaml"
KV = ROOT / "manifests" / "tiny-llama-kv.yaml"


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[..., Path]:
    """Write a YAML manifest from a dict; the test shows its whole input."""

    def write(data: dict[str, Any], name: str = "m.yaml", directory: Path | None = None) -> Path:
        path = (directory or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def run_qbuild(*args: str, cache: Path | None = None, env: dict[str, str] | None = None,
               check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    if cache is not None:
        full_env["QBUILD_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, "-m", "qbuild", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"qbuild {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def quick_bench(name: str, timeout: int = 300) -> dict[str, Any]:
    """Run ``bench/NAME.py --quick`` in a fresh process; it must exit 0 and end with one JSON line (rule 15) for
    this bench in quick mode, which is returned."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick"], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["bench"] == name and last["quick"] is True and "machine" in last
    return last


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def warm_tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding a complete build of manifests/tiny-llama.yaml."""
    from qbuild.api import build

    cache = tmp_path_factory.mktemp("warm") / "cache"
    build(TINY, cache_dir=cache)
    return cache


@pytest.fixture(scope="session")
def warm_kv_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the load and export entries of manifests/tiny-llama-kv.yaml: what every variant of a
    compile-flag or bucket sweep shares (their keys never read those settings)."""
    from qbuild.api import build

    cache = tmp_path_factory.mktemp("warm-kv") / "cache"
    build(KV, cache_dir=cache, until="export")
    return cache


def copy_cache(warm: Path, dst: Path) -> Path:
    """A private copy of a warm cache that a test may change."""
    shutil.copytree(warm, dst, symlinks=True)
    return dst


@pytest.fixture
def tiny_cache(warm_tiny_cache: Path, tmp_path: Path) -> Path:
    """A private copy of the warm cache that a test may change."""
    dst = tmp_path / "cache"
    shutil.copytree(warm_tiny_cache, dst, symlinks=True)
    return dst

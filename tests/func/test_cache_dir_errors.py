"""A cache directory that cannot be used fails once, when the store opens, with a CacheError (exit 8) naming
the path and why: a regular file, a path under a file, a path that cannot be created, a read-only directory.
A read-only ``plan`` still works on a cache directory that does not exist yet, and creates nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qbuild.errors import CacheError
from qbuild.store.store import Store
from tests.conftest import TINY, run_qbuild

COMMANDS = {"plan": ["plan", str(TINY)], "build": [str(TINY)]}


def refused(command: str, cache: Path, why: str) -> str:
    proc = run_qbuild(*COMMANDS[command], "--cache-dir", str(cache))
    assert proc.returncode == 8, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].startswith("qbuild: error: cache directory"), proc.stderr
    assert str(cache) in errors[0] and why in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_regular_file(tmp_path: Path, command: str) -> None:
    file = tmp_path / "cache"
    file.write_text("not a directory")
    refused(command, file, "not a directory")
    assert file.read_text() == "not a directory"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_path_under_a_file(tmp_path: Path, command: str) -> None:
    (tmp_path / "file").write_text("")
    line = refused(command, tmp_path / "file" / "cache", "cannot exist")
    assert f"{tmp_path / 'file'} is a file" in line


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_a_path_that_cannot_be_created() -> None:
    line = refused("build", Path("/proc/nope/cache"), "cannot create it")
    assert "/proc" in line
    plan = run_qbuild("plan", str(TINY), "--cache-dir", "/proc/nope/cache")  # plan writes nothing: it can plan
    assert plan.returncode == 0 and "no record" in plan.stdout, plan.stderr


def test_plan_works_on_a_cache_that_does_not_exist_yet(tmp_path: Path) -> None:
    cache = tmp_path / "new" / "cache"
    proc = run_qbuild("plan", str(TINY), "--cache-dir", str(cache))
    assert proc.returncode == 0 and "no record" in proc.stdout, proc.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_read_only_directory(tmp_path: Path, command: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        if command == "plan":  # reading is all plan does
            proc = run_qbuild(*COMMANDS["plan"], "--cache-dir", str(cache))
            assert proc.returncode == 0, proc.stderr
        else:
            refused(command, cache, "not writable")
    finally:
        cache.chmod(0o755)


def test_a_read_only_file_system_is_refused_when_the_store_opens(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only mount answers (access(2) says EROFS even to root), simulated: root cannot chmod its
    way into that answer."""
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)
    with pytest.raises(CacheError, match="not writable"):
        Store(tmp_path)
    Store(tmp_path, readonly=True).close()

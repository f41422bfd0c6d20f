"""The error helpers: one ``one_line``, and one ``CannotExecute`` (a RunError) wherever an artifact cannot run here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qbuild.errors import CannotExecute, QBuildError, RunError, one_line
from tests.conftest import ROOT

FAKE_COMPILER = ROOT / "tests" / "fixtures" / "fake-qaic-compile"


def test_one_line_is_defined_once_in_errors() -> None:
    pattern = re.compile(r"^\s*def _?one_line\(", re.M)
    defs = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "qbuild").rglob("*.py"))
            for _ in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert defs == ["qbuild/errors.py"]


def test_one_line_keeps_the_type_and_the_line_after_a_colon() -> None:
    assert one_line(ValueError("bad shape:\n  [2, 3]\nmore")) == "ValueError: bad shape: [2, 3]"
    assert one_line(KeyError("x")) == "KeyError: 'x'"
    assert one_line(RuntimeError("first\nsecond")) == "RuntimeError: first"
    assert len(one_line(RuntimeError("x" * 1000))) == 300


def test_cannot_execute_is_a_run_error() -> None:
    assert issubclass(CannotExecute, RunError) and issubclass(CannotExecute, QBuildError)
    assert CannotExecute.exit_code == RunError.exit_code == 9


@pytest.fixture
def no_qaicrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A machine without the Cloud AI 100 runtime; the stand-in compiler makes compile.backend=qaic plannable."""
    from qbuild.runtime.qaic import qaicrt_available

    monkeypatch.setenv("QAIC_SDK_DIR", str(tmp_path / "no-sdk"))
    if qaicrt_available():
        pytest.skip("qaicrt is importable here")
    return ["compile.backend=qaic", f"compile.qaic.compiler={FAKE_COMPILER}"]


def test_run_raises_cannot_execute_before_building(no_qaicrt: list[str], tmp_path: Path) -> None:
    from qbuild.api import run

    with pytest.raises(CannotExecute, match="qbuild run cannot execute a qaic artifact on this machine"):
        run(ROOT / "manifests" / "tiny-llama-kv.yaml", no_qaicrt, prompts=["Hi"], cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "objects").exists()


def test_embed_raises_cannot_execute_before_building(no_qaicrt: list[str], tmp_path: Path) -> None:
    from qbuild.api import embed

    with pytest.raises(CannotExecute, match="qbuild embed cannot execute a qaic artifact on this machine"):
        embed(ROOT / "manifests" / "tiny-bert.yaml", ["hi"], no_qaicrt, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "objects").exists()

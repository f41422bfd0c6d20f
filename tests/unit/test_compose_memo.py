"""The compose memo: a repeated composition skips Hydra; any changed config file invalidates it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from qbuild.manifest import compose


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_memo_hit_skips_hydra(tmp_path: Path) -> None:
    m = _write(tmp_path / "m" / "x.yaml", {"defaults": [{"model": "tiny-llama"}, "_self_"]})
    memo = tmp_path / "memo"
    first = compose(m, ["compile.onnxruntime.threads=3"], memo_dir=memo)
    assert len(list(memo.glob("*.json"))) == 1
    code = ("import sys, json; from qbuild.manifest import compose\n"
            f"c = compose({str(m)!r}, ['compile.onnxruntime.threads=3'], "
            f"memo_dir=__import__('pathlib').Path({str(memo)!r}))\n"
            "print(json.dumps({'hydra': 'hydra' in sys.modules, 'config': c.config}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)
    assert out == {"hydra": False, "config": first.config}


def test_changed_group_file_or_override_misses(tmp_path: Path) -> None:
    m = _write(tmp_path / "m" / "x.yaml", {"defaults": [{"compile": "mine"}, "_self_"],
                                           "model": {"init": "random", "architecture": "llama"}})
    group = _write(tmp_path / "m" / "compile" / "mine.yaml", {"onnxruntime": {"threads": 4}})
    memo = tmp_path / "memo"
    assert compose(m, memo_dir=memo).manifest.compile.onnxruntime.threads == 4
    _write(group, {"onnxruntime": {"threads": 5}})
    assert compose(m, memo_dir=memo).manifest.compile.onnxruntime.threads == 5
    assert compose(m, ["compile.onnxruntime.threads=6"], memo_dir=memo).manifest.compile.onnxruntime.threads == 6


def test_resolvers_are_not_memoised(tmp_path: Path, monkeypatch) -> None:
    m = _write(tmp_path / "x.yaml", {"model": {"init": "random", "architecture": "llama",
                                               "revision": "${oc.env:QB_REV}"}})
    memo = tmp_path / "memo"
    monkeypatch.setenv("QB_REV", "a")
    assert compose(m, memo_dir=memo).manifest.model.revision == "a"
    monkeypatch.setenv("QB_REV", "b")
    assert compose(m, memo_dir=memo).manifest.model.revision == "b"
    assert not memo.exists()


def test_invalid_config_is_not_memoised(tmp_path: Path) -> None:
    import pytest

    from qbuild.errors import ManifestError

    m = _write(tmp_path / "x.yaml", {"compile": {"onnxruntime": {"threads": 0}}})
    with pytest.raises(ManifestError):
        compose(m, memo_dir=tmp_path / "memo")
    assert not (tmp_path / "memo").exists()


def test_edited_memo_is_ignored_and_rewritten(tmp_path: Path) -> None:
    """A memo changed after it was written (still valid JSON) does not match its digest: composed again."""
    m = _write(tmp_path / "m" / "x.yaml", {"defaults": [{"model": "tiny-llama"}, "_self_"]})
    memo = tmp_path / "memo"
    assert compose(m, memo_dir=memo).manifest.model.seed == 0
    (f,) = memo.glob("*.json")
    data = json.loads(f.read_text())
    data["config"]["model"]["seed"] = 7
    f.write_text(json.dumps(data))
    assert compose(m, memo_dir=memo).manifest.model.seed == 0
    assert json.loads(f.read_text())["config"]["model"]["seed"] == 0  # rewritten from the manifest


def test_memo_of_another_key_or_format_is_ignored(tmp_path: Path) -> None:
    from qbuild.manifest import memo

    memo.save(tmp_path, "a" * 64, {"x": 1})
    assert memo.load(tmp_path, "a" * 64) == {"x": 1}
    (tmp_path / f"{'b' * 64}.json").write_text((tmp_path / f"{'a' * 64}.json").read_text())
    assert memo.load(tmp_path, "b" * 64) is None
    (tmp_path / f"{'c' * 64}.json").write_text(json.dumps({"x": 1}))  # a format-1 memo: the bare config
    assert memo.load(tmp_path, "c" * 64) is None


def test_resolvers_in_hydra_settings_do_not_prevent_the_memo(tmp_path: Path) -> None:
    """qbuild/conf/hydra/launcher/*.yaml use ${...} resolvers; they never reach the job's configuration."""
    from qbuild.manifest import memo

    m = _write(tmp_path / "m" / "x.yaml", {"defaults": [{"model": "tiny-llama"}, "_self_"]})
    _write(tmp_path / "m" / "hydra" / "launcher" / "mine.yaml", {"dir": "${now:%H}"})
    assert memo.memo_key(m, []) is not None
    _write(tmp_path / "m" / "model" / "mine.yaml", {"revision": "${oc.env:X}"})
    assert memo.memo_key(m, []) is None

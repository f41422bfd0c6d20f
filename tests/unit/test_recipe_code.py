"""Editing the code that shapes an output changes its key, with no version number to bump; each backend
and task versions on its own. Runs on a copy of the qbuild package (no torch)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

import qbuild
from qbuild.plan import params as params_mod
from qbuild.plan.planner import resolve_stages
from qbuild.store import Store
from tests.unit.test_key_property import FAKE_SDK, LLAMA, put

PACKAGE = Path(qbuild.__file__).parent
#: modules that cannot shape any stage's output: the command line, the API, planning, execution and the
#: store move artifacts around but never compute them. Every other module must be in some recipe. The
#: QEfficient-style API (qeff/) composes manifests and saves a loaded model's files, whose digests key load.
NOT_RECIPES = ("__init__.py", "__main__.py", "api.py", "cli.py", "errors.py", "sweep.py", "ci.py", "bundle.py",
               "cache_cli.py", "execute/*.py", "qeff/*.py",
               "manifest/*.py", "plan/*.py", "store/*.py", "conf/*.py", "stages/__init__.py")


def recipe_files() -> set[str]:
    from qbuild.backends import _BACKENDS, get_backend
    from qbuild.stages.adapters import AdaptersStage
    from qbuild.stages.compile import CompileStage
    from qbuild.stages.export import ExportStage
    from qbuild.stages.finetune import FinetuneStage
    from qbuild.stages.load import LoadStage
    from qbuild.stages.verify import VerifyStage
    from qbuild.stages.vlm import VLMLoadStage
    from qbuild.tasks import _TASKS, get_task
    from qbuild.tasks.kv_lora import KVLoraTask

    patterns: set[str] = {*LoadStage.code, *FinetuneStage.code, *AdaptersStage.code}
    patterns |= set(VLMLoadStage.code)  # issue 13: an image-text-to-text build's stages (qbuild/stages/vlm.py)
    for task in [*(get_task(t) for t in _TASKS), KVLoraTask()]:  # KVLoraTask: causal_lm_kv with model.adapters
        patterns |= {*ExportStage(task).code, *VerifyStage(task).code}
        for b in _BACKENDS:
            patterns |= set(CompileStage(get_backend(b), task).code)
    return {p.relative_to(PACKAGE).as_posix() for p in params_mod.code_files(tuple(sorted(patterns)))}


def test_every_module_is_a_recipe_or_declared_unable_to_shape_an_output() -> None:
    every = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    plain = {p.relative_to(PACKAGE).as_posix() for pattern in NOT_RECIPES for p in PACKAGE.glob(pattern)}
    unclassified = every - recipe_files() - plain
    assert not unclassified, f"add these to a stage/task/backend's code, or to NOT_RECIPES: {sorted(unclassified)}"


@pytest.fixture
def package_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "qbuild"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(params_mod, "_PACKAGE", copy)
    params_mod.code_files.cache_clear()
    yield copy
    params_mod.code_files.cache_clear()


def _keys(store: Store, **extra: Any) -> dict[str, str]:
    from qbuild.manifest.validate import to_manifest

    data = {"model": LLAMA, "transforms": {"apply": ["kv_cache"]}}
    for key, value in extra.items():
        data = put(data, key.replace("__", "."), value)
    resolved, _ = resolve_stages(to_manifest(data), store)
    return {r.stage.name: r.key for r in resolved}


def test_editing_a_recipe_rebuilds_what_it_shapes_and_nothing_else(package_copy: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = tmp_path / "sdk"
    shutil.copytree(FAKE_SDK, sdk)
    store = Store(tmp_path / "cache", readonly=True)

    def both() -> tuple[dict[str, str], dict[str, str]]:
        return _keys(store), _keys(store, compile__backend="qaic", compile__qaic__sdk_dir=str(sdk))

    def edit(rel: str) -> None:
        path = package_copy / rel
        path.write_text(path.read_text() + "\n# an edit\n")

    ort, qaic = both()
    edit("backends/qaic_command.py")  # the qaic argv changes: only qaic compiles (and their verify) rebuild
    ort2, qaic2 = both()
    assert ort2 == ort
    assert qaic2["export"] == qaic["export"] and qaic2["compile"] != qaic["compile"]
    edit("backends/onnxruntime.py")
    ort3, qaic3 = both()
    assert qaic3 == qaic2
    assert ort3["export"] == ort["export"] and ort3["compile"] != ort["compile"] and ort3["verify"] != ort["verify"]
    edit("tasks/kv_causal_lm.py")  # the task's recipe: export and everything after it, both backends
    ort4, qaic4 = both()
    assert ort4["load"] == ort["load"] and ort4["export"] != ort["export"] and qaic4["export"] != qaic["export"]
    edit("tasks/embedding.py")  # another task's recipe changes nothing here
    assert both() == (ort4, qaic4)
    edit("models/source.py")  # how weights are made: from load on
    ort5, _ = both()
    assert all(ort5[s] != ort4[s] for s in ort5)


def test_a_code_change_is_a_plan_reason(package_copy: Path, tmp_path: Path) -> None:
    from qbuild.plan.planner import explain

    store = Store(tmp_path / "cache", readonly=True)
    from qbuild.manifest.validate import to_manifest

    m = to_manifest({"model": LLAMA})
    before = {r.stage.name: r for r in resolve_stages(m, store)[0]}
    path = package_copy / "tasks/causal_lm.py"
    path.write_text(path.read_text() + "\n# an edit\n")
    after = {r.stage.name: r for r in resolve_stages(m, store)[0]}
    prev = {"identity": before["export"].identity, "reads": before["export"].reads}
    assert explain(prev, after["export"].identity, after["export"].reads) == [
        "recipe code: qbuild/tasks/causal_lm.py changed"]

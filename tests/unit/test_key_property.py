"""The key property, by walking the schema (no hand-kept list of which key covers which value).

For every manifest leaf and every stage: if the stage's params never read the leaf (the planner records
every read through a ``Recorder``), no value of the leaf changes that stage's key; if they read it, some
value of it does. Leaves declared ``content=True`` locate files: a copy of the same content elsewhere
changes no key, a changed byte does. Leaves declared ``key=False`` change no key. Runs without torch.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest

from qbuild.errors import QBuildError
from qbuild.manifest.schema import Manifest
from qbuild.manifest.validate import to_manifest
from qbuild.plan.planner import resolve_stages
from qbuild.store import Store
from tests.conftest import ROOT

FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-sdk"
LLAMA = {"init": "random", "architecture": "llama", "tokenizer": "train-bpe",
         "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "vocab_size": 256}}

#: a tiny Gemma 3 VLM (issue 13): planning reads its vision sizes from this config
GEMMA3_VLM = {"task": "image-text-to-text", "init": "random", "architecture": "gemma3",
              "config": {"text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                                         "vocab_size": 256},
                         "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                         "mm_tokens_per_image": 4}}


@dataclasses.dataclass(frozen=True)
class Leaf:
    key: str
    type: Any
    meta: Any


def leaves(cls: type = Manifest, prefix: str = "") -> Iterator[Leaf]:
    """Every leaf of the schema, by dotted key."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name], key + ".")
        else:
            yield Leaf(key, hints[f.name], f.metadata)


def get(data: dict, key: str, default: Any) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def put(data: dict, key: str, value: Any) -> dict:
    out = copy.deepcopy(data)
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def default_of(leaf: Leaf) -> Any:
    node: Any = Manifest()
    for part in leaf.key.split("."):
        node = getattr(node, part)
    return node


def alternatives(leaf: Leaf, value: Any) -> list[Any]:
    """Other values of a leaf's type (the validator rejects what does not fit)."""
    m = leaf.meta
    if "choices" in m:
        return [c for c in m["choices"] if c != value]
    union = get_origin(leaf.type) in (Union, types.UnionType)
    args = set(get_args(leaf.type)) if union else set()
    base = next(iter(args - {type(None)})) if union else leaf.type
    alts: list[Any] = [] if value is None or type(None) not in args else [None]
    if base is bool:
        alts.append(not value)
    elif base is int:
        alts += [v for v in ((value or 1) + 1, (value or 2) - 1) if m.get("min", -10**9) <= v <= m.get("max", 10**9)]
    elif base is float:
        alts += [0.5, 1e-3]
    elif base is str:
        alts += [f"{value}x" if value else "x", "mistral"]
    elif get_origin(base) is list:
        item = get_args(base)[0]
        extra = {int: lambda: [value[-1] * 2 if value else 8], str: lambda: ["custom_rmsnorm", "hello"],
                 dict[str, Any]: lambda: [{"name": "x", "seed": 1}]}[item]()  # model.adapters: a random adapter
        alts += [[*value, x] for x in extra] + ([value[:1]] if len(value) > 1 else []) + ([[]] if value else [])
    elif get_origin(base) is dict:
        alts.append({**value, "extra_key": 1})
    return [a for a in alts if a != value]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Base manifests (causal LM, KV on ONNX Runtime and on qaic, embedding, checkpoint) and files to point at."""
    tmp = tmp_path_factory.mktemp("keys")
    sdk = tmp / "sdk"
    shutil.copytree(FAKE_SDK, sdk)
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    (ckpt / "model.safetensors").write_bytes(bytes(range(256)))
    npi = tmp / "npi.yaml"
    npi.write_text("FP32NodeInstanceNames:\n  - a\n")
    kv = {"model": LLAMA, "transforms": {"apply": ["kv_cache"]}, "seq": {"lengths": [8, 16], "ctx_len": 64}}
    bases = {
        "causal_lm": {"model": LLAMA},
        "kv": kv,
        "kv-qaic": put(put(kv, "compile.backend", "qaic"), "compile.qaic.sdk_dir", str(sdk)),
        "kv-lora": put(kv, "model.adapters", [{"name": "a", "seed": 1}]),  # issue 15: the adapters stage
        "vlm": {"model": GEMMA3_VLM, "seq": {"lengths": [32], "ctx_len": 64}},  # issue 13: two branches, vlm.*
        "vlm-single": {"model": GEMMA3_VLM, "seq": {"lengths": [32], "ctx_len": 64}, "vlm": {"mode": "single"}},
        "vlm-llama4": {"model": {**GEMMA3_VLM, "architecture": "llama4", "config": {  # reads vlm.max_num_tiles
            "vision_config": {"image_size": 32, "patch_size": 8}}}, "seq": {"lengths": [32], "ctx_len": 64}},
        "embedding": {"model": {**LLAMA, "architecture": "bert", "task": "embedding", "tokenizer": None,
                                "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                           "intermediate_size": 64, "vocab_size": 128}},
                      "pooling": {"method": "mean"}},
        "checkpoint": {"model": {"path": str(ckpt)}},
    }
    return {"tmp": tmp, "bases": bases, "store": Store(tmp / "cache", readonly=True),
            "files": {"model.path": ckpt, "compile.qaic.sdk_dir": sdk, "compile.qaic.node_precision_info": npi,
                      "compile.qaic.compiler": sdk / "exec" / "qaic-compile"}}


def keys_and_deps(data: dict, store: Store) -> tuple[dict[str, str], dict[str, set[str]]] | None:
    """Per stage: its key, and the manifest leaves it depends on (its reads and its upstream's)."""
    try:
        resolved, _notes = resolve_stages(to_manifest(data), store)
    except QBuildError:
        return None
    keys, deps = {}, {}
    for r in resolved:
        keys[r.stage.name] = r.key
        deps[r.stage.name] = set(r.reads).union(*(deps[u] for u in r.stage.upstream))
    return keys, deps


def copy_of(path: Path, tmp: Path, change: bool) -> Path:
    """A copy of a file or directory elsewhere; ``change``: with one byte of its largest file flipped."""
    dest = tmp / f"{path.name}-{'changed' if change else 'copy'}"
    if not dest.exists():
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, dest)
        if change:
            target = dest if dest.is_file() else max(dest.rglob("*"), key=lambda p: p.stat().st_size if p.is_file()
                                                     else -1)
            data = bytearray(target.read_bytes())
            data[-1] ^= 1
            target.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("base_name", ["causal_lm", "kv", "kv-qaic", "kv-lora", "vlm", "vlm-single", "vlm-llama4",
                                       "embedding", "checkpoint"])
def test_a_key_changes_exactly_with_what_its_stage_read(world: dict[str, Any], base_name: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAIC_SDK_DIR", str(world["files"]["compile.qaic.sdk_dir"]))  # auto can find qaic
    base, store = world["bases"][base_name], world["store"]
    base_keys, base_deps = keys_and_deps(base, store)  # type: ignore[misc]
    exercised, problems = 0, []
    for leaf in leaves():
        if leaf.meta.get("content"):
            continue  # test_content_leaves
        value = get(base, leaf.key, default_of(leaf))
        changed: set[str] = set()
        present: set[str] = set()  # stages the changed manifests still have (verify may be dropped)
        valid = 0
        for alt in alternatives(leaf, value):
            got = keys_and_deps(put(base, leaf.key, alt), store)
            if got is None:
                continue
            valid += 1
            for stage in set(base_keys) & set(got[0]):
                present.add(stage)
                if got[0][stage] != base_keys[stage]:
                    changed.add(stage)
                    if leaf.key not in base_deps[stage] or leaf.meta.get("key") is False:
                        problems.append(f"{leaf.key}={alt!r} changed the {stage} key, which never read it")
        exercised += valid > 0
        if valid and leaf.meta.get("key") is not False:
            for stage, deps in base_deps.items():
                if leaf.key in deps and stage in present and stage not in changed:
                    problems.append(f"{stage} read {leaf.key} but none of its values changed the {stage} key")
    assert not problems, "\n".join(problems)
    assert exercised >= 25, exercised


@pytest.mark.parametrize(("base_name", "key"), [
    ("checkpoint", "model.path"), ("kv-qaic", "compile.qaic.sdk_dir"), ("kv-qaic", "compile.qaic.compiler"),
    ("kv-qaic", "compile.qaic.node_precision_info"),
])
def test_content_leaves_key_on_content_not_location(world: dict[str, Any], base_name: str, key: str) -> None:
    base, store, tmp = world["bases"][base_name], world["store"], world["tmp"]
    original = world["files"][key]
    at_original = keys_and_deps(put(base, key, str(original)), store)
    at_copy = keys_and_deps(put(base, key, str(copy_of(original, tmp, change=False))), store)
    assert at_original is not None and at_copy is not None
    assert at_copy[0] == at_original[0], f"{key}: the same content elsewhere changed a key"
    readers = {s for s, deps in at_original[1].items() if key in deps}
    assert readers, f"no stage read {key}"
    if key in ("model.path", "compile.qaic.node_precision_info"):  # a changed byte rebuilds every reader
        changed = keys_and_deps(put(base, key, str(copy_of(original, tmp, change=True))), store)
        assert changed is not None
        assert {s for s in readers if changed[0][s] != at_original[0][s]} == readers


#: compile settings the export does read: a build compiled by qaic exports QEfficient's graph form (issue 17:
#: CtxScatter/CtxGather, CustomRMSNorm, bfloat16 as float32 on ai100, decoder layers as functions); an onnxruntime
#: build of a KV model exports its attention as GroupQueryAttention or not (compile.onnxruntime.attention)
EXPORT_READS = {"compile.backend", "compile.qaic.use_onnx_subfunctions", "compile.qaic.aic_hw_version",
                "compile.qaic.device_group", "compile.qaic.compiler", "compile.qaic.sdk_dir",
                "compile.onnxruntime.attention"}


@pytest.mark.parametrize("base_name", ["causal_lm", "kv", "kv-qaic", "kv-lora", "vlm", "vlm-single", "vlm-llama4",
                                       "embedding", "checkpoint"])
def test_buckets_compile_and_verify_settings_never_reach_load_or_export(world: dict[str, Any], base_name: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A change to a compile flag or a bucket recompiles; it never re-exports (the graph is symbolic)."""
    monkeypatch.setenv("QAIC_SDK_DIR", str(world["files"]["compile.qaic.sdk_dir"]))
    _keys, deps = keys_and_deps(world["bases"][base_name], world["store"])  # type: ignore[misc]
    for stage in ("load", "export"):
        allowed = EXPORT_READS if stage == "export" else set()
        assert not {k for k in deps[stage] if k.startswith(("seq.", "compile.", "verify.")) and k not in allowed}, (
            stage, deps[stage])


def test_the_schema_walk_sees_every_group() -> None:
    """The walk reaches the nested groups (a schema change cannot hide leaves from the property test)."""
    keys = {leaf.key for leaf in leaves()}
    assert {"compile.qaic.num_cores", "compile.onnxruntime.threads", "seq.ctx_len", "verify.atol",
            "model.config", "pooling.method", "export.opset", "name"} <= keys
    assert all(not dataclasses.is_dataclass(leaf.type) for leaf in leaves())

"""The manifest layer: Hydra composition of YAML / TOML manifests and schema validation (no torch)."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qbuild.errors import ManifestError
from qbuild.manifest import ComposedManifest, Manifest, compose, to_manifest, to_yaml
from qbuild.manifest import validate as validate_mod

# the package attribute ``qbuild.manifest.compose`` is the function; the module is reached by name
compose_mod = importlib.import_module("qbuild.manifest.compose")

REPO = Path(__file__).resolve().parents[2]
YAML = REPO / "manifests" / "tiny-llama.yaml"
TOML = REPO / "manifests" / "tiny-llama.toml"

TINY = {"model": {"init": "random", "architecture": "llama"}}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def manifest_error(path: Path, overrides: list[str] | None = None) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        compose(path, overrides or [])
    return info.value


# --- composing ------------------------------------------------------------------------------------


def test_tiny_llama_composes() -> None:
    c = compose(YAML)
    assert isinstance(c, ComposedManifest) and isinstance(c.manifest, Manifest)
    assert c.source == YAML.resolve() and c.name == "tiny-llama"
    m = c.manifest
    assert (m.model.init, m.model.architecture, m.model.seed) == ("random", "llama", 0)
    assert m.model.config["num_hidden_layers"] == 2 and m.model.config["tie_word_embeddings"] is False
    assert m.transforms.apply == [] and m.pooling.method == "none"
    assert (m.seq.lengths, m.seq.ctx_len, m.seq.batch_size) == ([32], 128, 1)
    assert m.compile.backend == "onnxruntime"
    assert "hydra" not in c.config and c.config["model"]["config"]["hidden_size"] == 64
    assert "hidden_size: 64" in to_yaml(c.config)


def test_manifest_is_frozen() -> None:
    m = compose(YAML).manifest
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.compile.onnxruntime.threads = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.compile.qaic.num_cores = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides",
    [[], ["compile.onnxruntime.threads=8", "seq=buckets", "+model.config.rope_theta=10000.0", "verify.seq_len=8"],
     ["compile=qaic", "compile.qaic.num_cores=8"]],
)
def test_yaml_and_toml_compose_identically(overrides: list[str]) -> None:
    from_yaml, from_toml = compose(YAML, overrides), compose(TOML, overrides)
    assert from_yaml.config == from_toml.config
    assert from_yaml.manifest == from_toml.manifest
    assert from_yaml.name == from_toml.name == "tiny-llama"


def test_overrides_change_values() -> None:
    overrides = [
        "compile.qaic.num_cores=8",
        "compile=qaic",
        "seq=buckets",
        "verify.seq_len=8",  # not in the manifest: the schema default is overridden
        "export.opset=18",
        "model.config.hidden_size=32",
        "+model.config.rope_theta=10000.0",
        "name=renamed",
    ]
    c = compose(YAML, overrides)
    m = c.manifest
    assert (m.compile.backend, m.compile.qaic.num_cores, m.compile.onnxruntime.threads) == ("qaic", 8, 2)
    assert (m.seq.lengths, m.seq.ctx_len) == ([32, 128], 256)
    assert (m.verify.seq_len, m.export.opset) == (8, 18)
    assert m.model.config["hidden_size"] == 32 and m.model.config["rope_theta"] == 10000.0
    assert c.name == "renamed"


def test_manifest_in_any_directory_uses_shipped_and_local_groups(tmp_path: Path) -> None:
    write(tmp_path / "model" / "local.yaml", "path: /models/local\n")
    manifest = write(
        tmp_path / "my.yaml",
        """\
        defaults:
          - model: local
          - seq: buckets
          - compile: qaic
          - _self_
        compile:
          qaic:
            num_cores: 4
        """,
    )
    c = compose(manifest)
    assert c.name == "my" and c.source == manifest.resolve()
    assert c.manifest.model.path == "/models/local"
    assert (c.manifest.seq.lengths, c.manifest.compile.backend, c.manifest.compile.qaic.num_cores) == (
        [32, 128],
        "qaic",
        4,
    )
    # the shipped and the local options of one group are both available
    assert compose(manifest, ["model=tiny-llama"]).manifest.model.init == "random"
    toml = write(
        tmp_path / "my.toml",
        """\
        defaults = [{model = "local"}, {seq = "buckets"}, {compile = "qaic"}, "_self_"]
        compile = {qaic = {num_cores = 4}}
        """,
    )
    assert compose(toml).config == c.config


def test_repeated_compose_restores_global_hydra() -> None:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobRuntime

    for _ in range(5):
        compose(YAML)
        compose(TOML)
    assert not GlobalHydra.instance().is_initialized()
    # inside a running Hydra app (e.g. a @hydra.main sweep) its state is left as it was
    with initialize_config_dir(config_dir=str(REPO / "manifests"), version_base=None, job_name="outer"):
        outer = GlobalHydra.instance().hydra
        assert compose(YAML, ["compile.onnxruntime.threads=3"]).manifest.compile.onnxruntime.threads == 3
        assert GlobalHydra.instance().hydra is outer
        assert JobRuntime().get("name") == "outer"


def test_searchpath_fallback_without_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compose_mod._plugin_active(), "hydra_plugins.qbuild_searchpath is not discovered by Hydra"
    monkeypatch.setattr(compose_mod, "_plugin_active", lambda: False)
    assert compose(YAML).config == compose(TOML).config


def test_yml_suffix(tmp_path: Path) -> None:
    yml = write(tmp_path / "m.yml", YAML.read_text())
    assert compose(yml).config == compose(YAML).config


# --- errors from composing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "fragments"),
    [
        ("compile.onnxruntime.thread=2", "compile.onnxruntime.thread", ["unknown key", "threads", "did you mean"]),
        ("model=tiny-lama", "model", ["unknown option 'tiny-lama'", "available: ", "did you mean 'tiny-llama'"]),
        ("compile.onnxruntime.threads=abc", "compile.onnxruntime.threads", ["expected int", "'abc'"]),
        ("compile.onnxruntime.threads=-1", "compile.onnxruntime.threads", ["-1", "between 1 and 64"]),
        ("compile.onnxruntime.threads=true", "compile.onnxruntime.threads", ["expected int", "bool"]),
        ("compile.qaic.num_cores=abc", "compile.qaic.num_cores", ["expected int", "'abc'"]),
        ("compile.qaic.num_cores=65", "compile.qaic.num_cores", ["65", "between 1 and 64"]),
        ("seq.lengths=[512]", "seq.lengths", ["[512]", "seq.ctx_len=128"]),
        ("seq.lengths=[0]", "seq.lengths", ["seq.lengths[0]", ">= 1"]),
        ("verify.seq_len=1000", "verify.seq_len", ["1000", "seq.ctx_len=128"]),
        ("compile.backend=qiac", "compile.backend", ["onnxruntime, qaic, auto", "did you mean 'qaic'"]),
        ("transforms=nonee", "transforms", ["unknown option 'nonee'", "none"]),
        ("+colour=red", "colour", ["unknown key", "valid keys in the top level", "model"]),
        ("~model", "model", ["missing model source", "model.path", "model.name", "model.init=random"]),
        ("model.path=/x", "model", ["more than one model source", "model.path", "model.init=random"]),
    ],
)
def test_bad_override(override: str, key: str, fragments: list[str]) -> None:
    err = manifest_error(YAML, [override])
    assert err.key == key
    for fragment in fragments:
        assert fragment in str(err)


@pytest.mark.parametrize("override", ["compile.onnxruntime.threads=[1", "=3", "compile.onnxruntime.threads"])
def test_override_syntax_error_names_the_override(override: str) -> None:
    err = manifest_error(YAML, [override])
    assert repr(override) in str(err) and "invalid syntax" in str(err)


def test_sweep_override_is_rejected() -> None:
    assert "sweep" in str(manifest_error(YAML, ["compile.onnxruntime.threads=1,2"]))


def test_missing_model(tmp_path: Path) -> None:
    err = manifest_error(write(tmp_path / "nomodel.yaml", "compile:\n  onnxruntime:\n    threads: 4\n"))
    assert err.key == "model"
    assert "missing model source" in str(err) and "model.path" in str(err) and "model.name" in str(err)


def test_random_init_needs_architecture(tmp_path: Path) -> None:
    err = manifest_error(write(tmp_path / "m.yaml", "model:\n  init: random\n"))
    assert err.key == "model.architecture" and "model.init=random" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    err = manifest_error(tmp_path / "nope.yaml")
    assert "not found" in str(err) and str(tmp_path / "nope.yaml") in str(err)


def test_unsupported_suffix(tmp_path: Path) -> None:
    assert ".json" in str(manifest_error(write(tmp_path / "m.json", "{}")))


def test_bad_toml(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", "defaults = [{model = 'tiny-llama'}\n")
    err = manifest_error(bad)
    assert str(bad) in str(err) and "invalid TOML" in str(err)


def test_bad_yaml(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "defaults: [1, 2\nname: x\n")
    err = manifest_error(bad)
    assert str(bad) in str(err) and "invalid YAML" in str(err)


def test_unknown_option_in_defaults_list(tmp_path: Path) -> None:
    err = manifest_error(write(tmp_path / "m.yaml", "defaults:\n  - model: tiny-lama\n"))
    assert err.key == "model" and "tiny-llama" in str(err) and "did you mean" in str(err)


def test_unknown_group(tmp_path: Path) -> None:
    err = manifest_error(write(tmp_path / "m.yaml", "defaults:\n  - modle: tiny-llama\n"))
    assert err.key == "modle" and "did you mean 'model'" in str(err)


def test_group_not_in_defaults_list(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.yaml", "defaults:\n  - model: tiny-bert\n")
    assert "+pooling=mean" in str(manifest_error(manifest, ["pooling=mean"]))
    assert compose(manifest, ["+pooling=mean"]).manifest.pooling.method == "mean"
    llama = write(tmp_path / "l.yaml", "defaults:\n  - model: tiny-llama\n")
    assert manifest_error(llama, ["+pooling=mean"]).key == "pooling.method"  # pooling a causal LM: an error


def test_interpolation_error_names_the_key(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.yaml", "defaults:\n  - model: tiny-llama\n  - _self_\nname: ${nope}\n")
    assert manifest_error(manifest).key == "name"


# --- to_manifest directly -------------------------------------------------------------------------


def test_to_manifest_defaults_and_conversions() -> None:
    m = to_manifest({**TINY, "verify": {"atol": 0}, "model": {**TINY["model"], "path": None}})
    assert m.verify.atol == 0.0 and isinstance(m.verify.atol, float)
    assert m.compile == type(m.compile)()
    assert to_manifest({**TINY, "model": {**TINY["model"], "config": {"a": [1], "b": None}}}).model.config


@pytest.mark.parametrize(
    ("data", "key", "fragments"),
    [
        ({"compile": {"onnxruntime": {"threads": True}}}, "compile.onnxruntime.threads", ["expected int", "bool True"]),
        ({"verify": {"atol": "x"}}, "verify.atol", ["expected float", "str 'x'"]),
        ({"compile": {"qaic": {"mxfp6_matmul": 1}}}, "compile.qaic.mxfp6_matmul", ["expected bool", "int 1"]),
        ({"model": {"revision": None}}, "model.revision", ["expected str", "null"]),
        ({"model": {"path": 3}}, "model.path", ["expected str or null", "int 3"]),
        ({"model": {"config": [1]}}, "model.config", ["expected mapping"]),
        ({"seq": {"lengths": 32}}, "seq.lengths", ["expected list of int", "int 32"]),
        ({"seq": {"lengths": [32, "x"]}}, "seq.lengths", ["seq.lengths[1]", "expected int"]),
        ({"seq": "default"}, "seq", ["expected mapping", "'default'"]),
        ({"model": {"init": "zeros"}}, "model.init", ["null, random"]),
        ({"export": {"opset": 30}}, "export.opset", ["30", "between 14 and 23"]),
        ({"export": {"opst": 17}}, "export.opst", ["exporter, opset", "did you mean 'opset'"]),
    ],
)
def test_to_manifest_errors(data: dict, key: str, fragments: list[str]) -> None:
    merged = {**TINY, **data}
    if "model" in data:
        merged["model"] = {**TINY["model"], **data["model"]}
    with pytest.raises(ManifestError) as info:
        to_manifest(merged)
    assert info.value.key == key
    for fragment in fragments:
        assert fragment in str(info.value)


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ManifestError) as info:
        to_manifest({**TINY, "compile": {"zzz": 1}})
    assert "did you mean" not in str(info.value) and "onnxruntime, qaic" in str(info.value)


# --- one configuration per backend: moved keys, the new keys ---------------------------------------

#: old key -> (a value that was valid there, the new places its error must name)
MOVED = {
    "compile.num_cores": (4, ["compile.qaic.num_cores", "compile.onnxruntime.threads"]),
    "compile.graph_optimization": ("all", ["compile.onnxruntime.graph_optimization"]),
    "compile.quantize": ("int8", ["compile.onnxruntime.quantize"]),
    "compile.session": ("fixed", ["compile.onnxruntime.session"]),
    "compile.mxfp6_matmul": (True, ["compile.qaic.mxfp6_matmul"]),
    "compile.mxint8_kv_cache": (True, ["compile.qaic.mxint8_kv_cache"]),
    "compile.num_devices": (2, ["compile.qaic.num_devices"]),
}


def _check_moved(err: ManifestError, old: str) -> None:
    assert err.key == old, str(err)
    assert str(err).startswith(f"{old}: moved"), str(err)
    for new in MOVED[old][1]:
        assert new in str(err)
    assert "unknown key" not in str(err)


def test_moved_keys_table_is_complete() -> None:
    assert sorted(validate_mod.MOVED_KEYS) == sorted(MOVED)


def test_moved_key_messages() -> None:
    assert validate_mod.MOVED_KEYS["compile.num_cores"] == (
        "moved; use compile.qaic.num_cores (Cloud AI 100 NSP cores) or "
        "compile.onnxruntime.threads (ONNX Runtime threads)")
    with pytest.raises(ManifestError) as info:
        to_manifest({**TINY, "compile": {"quantize": "int8"}})
    assert str(info.value) == "compile.quantize: moved to compile.onnxruntime.quantize"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_key_in_a_mapping(old: str) -> None:
    name = old.split(".", 1)[1]
    with pytest.raises(ManifestError) as info:
        to_manifest({**TINY, "compile": {"backend": "qaic", name: MOVED[old][0]}})
    _check_moved(info.value, old)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_key_in_yaml_toml_and_group_files(tmp_path: Path, old: str) -> None:
    name, value = old.split(".", 1)[1], MOVED[old][0]
    shown = str(value).lower() if isinstance(value, bool) else value
    quoted = f'"{shown}"' if isinstance(value, str) else shown
    _check_moved(manifest_error(write(tmp_path / "m.yaml", f"""\
        defaults:
          - model: tiny-llama
          - _self_
        compile:
          {name}: {shown}
        """)), old)
    _check_moved(manifest_error(write(tmp_path / "m.toml", f"""\
        defaults = [{{model = "tiny-llama"}}, "_self_"]
        compile = {{{name} = {quoted}}}
        """)), old)
    write(tmp_path / "compile" / "mine.yaml", f"backend: qaic\n{name}: {shown}\n")
    _check_moved(manifest_error(write(tmp_path / "g.yaml", """\
        defaults:
          - model: tiny-llama
          - compile: mine
        """)), old)


@pytest.mark.parametrize("old", sorted(MOVED))
@pytest.mark.parametrize("manifest", [YAML, TOML])
@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_moved_key_as_an_override(old: str, manifest: Path, prefix: str) -> None:
    value = MOVED[old][0]
    shown = str(value).lower() if isinstance(value, bool) else value
    _check_moved(manifest_error(manifest, [f"{prefix}{old}={shown}"]), old)
    _check_moved(manifest_error(manifest, ["compile=qaic", f"{prefix}{old}={shown}"]), old)


def test_moved_key_deleted_by_an_override() -> None:
    _check_moved(manifest_error(YAML, ["~compile.num_cores"]), "compile.num_cores")


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"onnxruntime": {"threads": 0}}, "compile.onnxruntime.threads", "between 1 and 64"),
        ({"onnxruntime": {"threads": 65}}, "compile.onnxruntime.threads", "between 1 and 64"),
        ({"onnxruntime": {"graph_optimization": "max"}}, "compile.onnxruntime.graph_optimization",
         "basic, extended, all"),
        ({"onnxruntime": {"quantize": "int2"}}, "compile.onnxruntime.quantize", "none, int8, int8_block, int4"),
        ({"onnxruntime": {"quantize": "none", "quantize_min_cosine": 0.99}}, "compile.onnxruntime.quantize_min_cosine",
         "but quantize is none"),
        ({"onnxruntime": {"session": "static"}}, "compile.onnxruntime.session", "auto, fixed, dynamic"),
        ({"qaic": {"num_cores": 0}}, "compile.qaic.num_cores", "between 1 and 64"),
        ({"qaic": {"num_cores": 65}}, "compile.qaic.num_cores", "between 1 and 64"),
        ({"qaic": {"num_devices": 0}}, "compile.qaic.num_devices", ">= 1"),
        ({"qaic": {"mxint8_kv_cache": "yes"}}, "compile.qaic.mxint8_kv_cache", "expected bool"),
        ({"onnxruntime": {"num_cores": 4}}, "compile.onnxruntime.num_cores", "threads"),
        ({"qaic": {"threads": 4}}, "compile.qaic.threads", "num_cores"),
    ],
)
def test_new_backend_keys_are_validated(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(ManifestError) as info:
        to_manifest({**TINY, "compile": data})
    assert info.value.key == key and fragment in str(info.value)


@pytest.mark.parametrize("mode", ["int8", "int8_block", "int4"])
def test_min_cosine_is_accepted_with_every_quantisation(mode: str) -> None:
    o = to_manifest({**TINY, "compile": {"onnxruntime": {"quantize": mode, "quantize_min_cosine": 0.99}}})
    assert (o.compile.onnxruntime.quantize, o.compile.onnxruntime.quantize_min_cosine) == (mode, 0.99)


def test_new_backend_keys_accept_their_ranges() -> None:
    m = to_manifest({**TINY, "compile": {
        "onnxruntime": {"threads": 64, "graph_optimization": "all", "quantize": "int4", "session": "fixed"},
        "qaic": {"num_cores": 1, "mxfp6_matmul": True, "mxint8_kv_cache": True, "num_devices": 4}}})
    ort, q = m.compile.onnxruntime, m.compile.qaic
    assert (ort.threads, ort.graph_optimization, ort.quantize, ort.session) == (64, "all", "int4", "fixed")
    assert (q.num_cores, q.mxfp6_matmul, q.mxint8_kv_cache, q.num_devices) == (1, True, True, 4)
    d = to_manifest(TINY).compile
    assert (d.onnxruntime.threads, d.onnxruntime.graph_optimization, d.onnxruntime.quantize,
            d.onnxruntime.session) == (2, "extended", "none", "auto")
    assert (d.qaic.num_cores, d.qaic.mxfp6_matmul, d.qaic.mxint8_kv_cache, d.qaic.num_devices) == (16, False, False, 1)


@pytest.mark.parametrize("manifest", [YAML, TOML])
def test_compile_qaic_keeps_the_two_core_counts_apart(manifest: Path) -> None:
    """No field with two meanings: compile=qaic sets the NSP cores; the ORT threads keep their default."""
    m = compose(manifest, ["compile=qaic"]).manifest
    assert (m.compile.backend, m.compile.qaic.num_cores, m.compile.onnxruntime.threads) == ("qaic", 16, 2)
    assert not hasattr(m.compile, "num_cores")
    m = compose(manifest, ["compile=qaic-mxfp6"]).manifest
    assert (m.compile.qaic.num_cores, m.compile.qaic.mxfp6_matmul, m.compile.qaic.mxint8_kv_cache) == (16, True, True)
    assert m.compile.onnxruntime.threads == 2
    m = compose(manifest, ["compile=qaic", "compile.onnxruntime.threads=4"]).manifest
    assert (m.compile.qaic.num_cores, m.compile.onnxruntime.threads) == (16, 4)
    m = compose(manifest).manifest  # onnxruntime: the qaic settings keep their own defaults
    assert (m.compile.backend, m.compile.onnxruntime.threads, m.compile.qaic.num_cores) == ("onnxruntime", 2, 16)


def test_unknown_transform(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ManifestError) as info:
        to_manifest({**TINY, "transforms": {"apply": ["no_such_transform"]}})
    assert info.value.key == "transforms.apply" and "no_such_transform" in str(info.value)
    monkeypatch.setattr(validate_mod, "_known_transforms", lambda: ["fuse_rmsnorm"])
    with pytest.raises(ManifestError) as info:
        to_manifest({**TINY, "transforms": {"apply": ["fuse_rmsnrom"]}})
    assert "known: fuse_rmsnorm" in str(info.value) and "did you mean 'fuse_rmsnorm'" in str(info.value)
    ok = to_manifest({**TINY, "transforms": {"apply": ["fuse_rmsnorm"]}})
    assert ok.transforms.apply == ["fuse_rmsnorm"]


# --- no heavy imports -----------------------------------------------------------------------------


def test_compose_imports_no_torch() -> None:
    code = textwrap.dedent(
        f"""\
        import sys
        from qbuild.manifest import compose
        compose({str(YAML)!r}, ["compile.onnxruntime.threads=4"])
        compose({str(TOML)!r})
        heavy = sorted(m for m in ("torch", "transformers", "onnx", "onnxruntime") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

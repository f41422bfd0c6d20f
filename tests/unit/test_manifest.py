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
        m.compile.num_cores = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides",
    [[], ["compile.num_cores=8", "seq=buckets", "+model.config.rope_theta=10000.0", "verify.seq_len=8"]],
)
def test_yaml_and_toml_compose_identically(overrides: list[str]) -> None:
    from_yaml, from_toml = compose(YAML, overrides), compose(TOML, overrides)
    assert from_yaml.config == from_toml.config
    assert from_yaml.manifest == from_toml.manifest
    assert from_yaml.name == from_toml.name == "tiny-llama"


def test_overrides_change_values() -> None:
    overrides = [
        "compile.num_cores=8",
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
    assert (m.compile.backend, m.compile.num_cores) == ("qaic", 8)
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
          num_cores: 4
        """,
    )
    c = compose(manifest)
    assert c.name == "my" and c.source == manifest.resolve()
    assert c.manifest.model.path == "/models/local"
    assert (c.manifest.seq.lengths, c.manifest.compile.backend, c.manifest.compile.num_cores) == (
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
        compile = {num_cores = 4}
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
        assert compose(YAML, ["compile.num_cores=3"]).manifest.compile.num_cores == 3
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
        ("compile.num_corse=2", "compile.num_corse", ["unknown key", "num_cores", "did you mean"]),
        ("model=tiny-lama", "model", ["unknown option 'tiny-lama'", "available: ", "did you mean 'tiny-llama'"]),
        ("compile.num_cores=abc", "compile.num_cores", ["expected int", "'abc'"]),
        ("compile.num_cores=-1", "compile.num_cores", ["-1", "between 1 and 64"]),
        ("compile.num_cores=true", "compile.num_cores", ["expected int", "bool"]),
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


@pytest.mark.parametrize("override", ["compile.num_cores=[1", "=3", "compile.num_cores"])
def test_override_syntax_error_names_the_override(override: str) -> None:
    err = manifest_error(YAML, [override])
    assert repr(override) in str(err) and "invalid syntax" in str(err)


def test_sweep_override_is_rejected() -> None:
    assert "sweep" in str(manifest_error(YAML, ["compile.num_cores=1,2"]))


def test_missing_model(tmp_path: Path) -> None:
    err = manifest_error(write(tmp_path / "nomodel.yaml", "compile:\n  num_cores: 4\n"))
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
        ({"compile": {"num_cores": True}}, "compile.num_cores", ["expected int", "bool True"]),
        ({"verify": {"atol": "x"}}, "verify.atol", ["expected float", "str 'x'"]),
        ({"compile": {"mxfp6_matmul": 1}}, "compile.mxfp6_matmul", ["expected bool", "int 1"]),
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
    assert "did you mean" not in str(info.value) and "num_cores" in str(info.value)


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
        compose({str(YAML)!r}, ["compile.num_cores=4"])
        compose({str(TOML)!r})
        heavy = sorted(m for m in ("torch", "transformers", "onnx", "onnxruntime") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

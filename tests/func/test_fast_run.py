"""A cached ``qbuild run`` imports neither torch nor transformers, and tokenises exactly as transformers does.

The export of a KV causal LM saves the ``tokenizers`` pipeline transformers builds (qbuild/runtime/tokenizer.py).
Checked here: the import list of a cached ``qbuild run``; ids and decoded text against transformers for the
tokenizer shapes of the KV families (hub-shaped tokenizer.json + tokenizer_config.json built from dicts,
where transformers 5 rebuilds the pipeline and the raw tokenizer.json would give other ids); the fallback to
transformers; and, per tiny family, ``run`` tokens == the verify stage's (== HF ``generate``) and texts ==
AutoTokenizer's decode.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qbuild.api import build, run
from qbuild.models.tokenizer import _CORPUS, PROBES, load_tokenizer, save_runtime_tokenizer
from qbuild.runtime.tokenizer import FastTokenizer, TransformersTokenizer, open_tokenizer
from tests.conftest import ROOT
from tests.func.test_generate import FAMILIES

KV = ROOT / "manifests" / "tiny-llama-kv.yaml"
TEXTS = [*PROBES, "<s> hello </s> <|endoftext|> <bos>x <|begin_of_text|>y", "", "   "]
HEAVY = re.compile(r"^import time:.*\|\s*(torch|transformers)(\.\S+)?\s*$")


@pytest.fixture(scope="module")
def kv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding a complete build of manifests/tiny-llama-kv.yaml."""
    cache = tmp_path_factory.mktemp("kv") / "cache"
    build(KV, cache_dir=cache)
    return cache


# --- the run path --------------------------------------------------------------------------------------

def test_cached_run_imports_neither_torch_nor_transformers(kv_cache: Path) -> None:
    env = {**os.environ, "QBUILD_CACHE": str(kv_cache)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qbuild", "run", str(KV), "--prompt", "hi",
                           "--max-new-tokens", "8", "--json"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = [ln for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    assert any(ln.rstrip().endswith("| onnxruntime") for ln in imported)  # -X importtime did report
    assert [ln for ln in imported if HEAVY.match(ln)] == []
    events = [json.loads(ln) for ln in proc.stderr.splitlines() if ln.startswith("{")]
    plan = next(e for e in events if e["event"] == "plan")
    assert {s["state"] for s in plan["stages"]} == {"cached"}
    assert not [e for e in events if e["event"] == "stage_built"]
    out = json.loads(proc.stdout)
    assert out["stats"]["tokenizer"] == "tokenizers" and len(out["results"][0]["tokens"]) <= 8


def test_run_equals_transformers_and_hf_generate(kv_cache: Path) -> None:
    """The verify prompts through ``run``: HF generate's tokens (verify.json) and AutoTokenizer's ids and text."""
    result = build(KV, cache_dir=kv_cache)
    report = json.loads(Path(result.artifacts["report"]).read_text())
    got = run(KV, prompts=report["prompts"], max_new_tokens=report["max_new_tokens"], cache_dir=kv_cache)
    assert got.stats["tokenizer"] == "tokenizers"
    assert got.tokens == report["tokens"]
    hf = load_tokenizer(Path(result.tokenizer_dir or ""))
    assert got.texts == [hf.decode(t, skip_special_tokens=True) for t in report["tokens"]]
    fast = open_tokenizer(Path(result.artifacts["onnx"]).parent, Path(""), Path(""))
    assert fast.encode(TEXTS) == [hf(t)["input_ids"] for t in TEXTS]
    assert [len(ids) for ids in fast.encode(report["prompts"])] == report["prompt_tokens"]


# --- tokenizer shapes of the KV families ------------------------------------------------------------------

SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _lines() -> list[str]:
    return _CORPUS.splitlines() * 4


def _spm_like(specials: list[str], bos: str) -> Any:
    """Llama-2 / Mistral / Gemma shape: a ``▁`` normaliser, byte fallback decoder, BOS by template."""
    from tokenizers import SentencePieceBPETokenizer, Tokenizer, decoders, normalizers, processors

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(_lines(), vocab_size=420, special_tokens=specials, show_progress=False)
    tok = Tokenizer.from_str(trained.to_str())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _byte_level(specials: list[str], bos: str | None = None) -> Any:
    """Qwen2 / GPT-2 / Llama-3 / Llama-4 shape: regex split + byte-level; Llama-3's BOS by template."""
    from tokenizers import ByteLevelBPETokenizer, Regex, Tokenizer, decoders, pre_tokenizers, processors

    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(_lines(), vocab_size=420, special_tokens=specials, show_progress=False)
    tok = Tokenizer.from_str(trained.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _unigram() -> Any:
    """A Unigram model (decode cleans up spaces: transformers skips that only for BPE)."""
    from tokenizers import SentencePieceUnigramTokenizer, Tokenizer

    trained = SentencePieceUnigramTokenizer()
    trained.train_from_iterator(_lines(), vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                unk_token="<unk>", show_progress=False)
    return Tokenizer.from_str(trained.to_str())


SPM = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False}
KINDS: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "llama2": (lambda: _spm_like(["<unk>", "<s>", "</s>"], "<s>"),
               {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                **SPM}),
    "mistral": (lambda: _spm_like(["<unk>", "<s>", "</s>"], "<s>"),
                {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
                 **SPM}),
    "gemma3": (lambda: _spm_like(["<pad>", "<eos>", "<bos>", "<unk>"], "<bos>"),
               {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}),
    "qwen2": (lambda: _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
              {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
               "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace"}),
    "gpt2": (lambda: _byte_level(["<|endoftext|>"]),
             {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "add_prefix_space": False, "model_max_length": 1024}),
    "llama3": (lambda: _byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], "<|begin_of_text|>"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True}),
    "unigram-clean-up": (_unigram, {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True,
                                    **{k: v for k, v in SPM.items() if k != "clean_up_tokenization_spaces"}}),
    # Grok-1 shape: config.json names only custom code; load_tokenizer reads tokenizer.json itself
    "custom-code": (lambda: _spm_like(["<pad>", "<s>", "</s>", "<unk>"], "<s>"),
                    {"tokenizer_class": "XTokenizer", "auto_map": {"AutoTokenizer": [None, "tokenization_x.XFast"]},
                     **SPM}),
}


def _tokenizer_dir(kind: str, directory: Path) -> Path:
    make, config = KINDS[kind]
    directory.mkdir(parents=True, exist_ok=True)
    make().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if kind == "custom-code":
        (directory / "config.json").write_text(json.dumps({"model_type": "x-custom", "auto_map": {
            "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    return directory


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_saved_pipeline_equals_transformers(kind: str, tmp_path: Path) -> None:
    directory = _tokenizer_dir(kind, tmp_path / kind)
    hf = load_tokenizer(directory)  # AutoTokenizer, or tokenizer.json for custom code (as verify uses it)
    if kind != "custom-code":
        from transformers import AutoTokenizer

        assert type(AutoTokenizer.from_pretrained(str(directory))) is type(hf)
    assert save_runtime_tokenizer(hf, tmp_path / "rt", [2, 3]) is None
    fast = FastTokenizer(tmp_path / "rt")
    want = [hf(t)["input_ids"] for t in TEXTS]
    assert fast.encode(TEXTS) == want
    assert [fast.decode(ids) for ids in want] == [hf.decode(ids, skip_special_tokens=True) for ids in want]
    assert fast.eos_token_id == [2, 3]


def test_raw_tokenizer_json_would_differ_from_transformers(tmp_path: Path) -> None:
    """Why the export saves transformers' pipeline: transformers 5 rebuilds these classes' pipelines."""
    from tokenizers import Tokenizer

    for kind in ("llama2", "gemma3", "qwen2"):
        directory = _tokenizer_dir(kind, tmp_path / kind)
        hf, raw = load_tokenizer(directory), Tokenizer.from_file(str(directory / "tokenizer.json"))
        assert any(raw.encode(t).ids != hf(t)["input_ids"] for t in TEXTS), kind


def test_a_tokenizer_with_its_own_decode_falls_back_to_transformers(tmp_path: Path) -> None:
    directory = _tokenizer_dir("llama3", tmp_path / "tok")
    hf = load_tokenizer(directory)
    own = type("OwnDecode", (type(hf),), {"_decode": lambda self, ids, **kw: "x"})
    hf.__class__ = own
    assert "overrides _decode" in (save_runtime_tokenizer(hf, tmp_path / "rt", 2) or "")
    assert not (tmp_path / "rt").exists()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    fallback = open_tokenizer(tmp_path, directory, tmp_path / "model")  # no tmp_path/tokenizer: nothing saved
    assert isinstance(fallback, TransformersTokenizer) and fallback.eos_token_id == [5, 7]
    assert fallback.encode(TEXTS) == [load_tokenizer(directory)(t)["input_ids"] for t in TEXTS]


# --- per family: run == verify (HF generate) ----------------------------------------------------------------

PROMPTS = ["My name is", "The capital of France is Paris, a city on the"]


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_family_run_equals_hf(model: str, tmp_path: Path) -> None:
    overrides = [f"model={model}", "seq.lengths=[8]", "seq.ctx_len=48", "verify.max_new_tokens=12",
                 "verify.prompts=" + json.dumps(PROMPTS), *FAMILIES[model]]
    got = run(KV, overrides, prompts=PROMPTS, max_new_tokens=12, cache_dir=tmp_path)  # builds, verify included
    result = build(KV, overrides, cache_dir=tmp_path)
    report = json.loads(Path(result.artifacts["report"]).read_text())
    assert got.stats["tokenizer"] == "tokenizers"
    assert got.tokens == report["tokens"]  # verify: == HF generate, with transformers' ids and EOS
    hf = load_tokenizer(Path(result.tokenizer_dir or ""))
    assert got.texts == [hf.decode(t, skip_special_tokens=True) for t in got.tokens]
    fast = open_tokenizer(Path(result.artifacts["onnx"]).parent, Path(""), Path(""))
    assert fast.encode(TEXTS) == [hf(t)["input_ids"] for t in TEXTS]

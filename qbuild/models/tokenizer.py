"""Tokenizers without a hub: a byte-level BPE trained in-process with vocab = model vocab; loading a local
tokenizer offline; and saving the ``tokenizers`` pipeline transformers built, for the runtime (no transformers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A small built-in corpus: enough merges for readable tokens on English prompts.
_CORPUS = """My name is Wolfgang and I live in Berlin. My name is Sarah and I live in London.
The quick brown fox jumps over the lazy dog. The capital of France is Paris, a city on the Seine.
Once upon a time there was a little girl who lived in a village near the forest.
Deploying a transformer to an inference accelerator is a pipeline: load the model, rewrite modules,
export to ONNX, compile with specialisations for each sequence length, then generate text.
The weather today is sunny with a light breeze from the west. It will rain tomorrow in the north.
In 1492 Columbus sailed the ocean blue. Water boils at 100 degrees Celsius at sea level.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
A journey of a thousand miles begins with a single step. Knowledge is power; time is money.
"""
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: pad, bos, eos as in Llama-style configs


def train_bpe(vocab_size: int, out_dir: Path) -> dict[str, int]:
    """Train a byte-level BPE of exactly ``vocab_size`` tokens and save it in ``out_dir``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet (259)")
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    lines = _CORPUS.splitlines() * 4
    tok.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=1, show_progress=False,
                            special_tokens=SPECIALS)
    short = vocab_size - tok.get_vocab_size()
    if short > 0:
        # the corpus ran out of merges: fill the BPE model's own vocabulary with reserved entries so ids match
        # the model (no merge produces them). Not added tokens: transformers deep-copies every added token
        # when it loads a tokenizer (31k reserved added tokens for a 32k vocabulary took ~1 s per load)
        from tokenizers import Tokenizer

        spec = json.loads(tok._tokenizer.to_str())
        vocab = spec["model"]["vocab"]
        first = len(vocab)
        vocab.update({f"<reserved_{i}>": first + i for i in range(short)})
        tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return {"vocab_size": len(fast), "pad_token_id": fast.pad_token_id, "eos_token_id": fast.eos_token_id}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tokenizer_auto_map(tokenizer_config: dict[str, Any]) -> Any:
    """The tokenizer's own remote code (``auto_map.AutoTokenizer`` of tokenizer_config.json), or None."""
    auto_map = tokenizer_config.get("auto_map")
    return auto_map if isinstance(auto_map, (list, tuple)) else (auto_map or {}).get("AutoTokenizer")


def _plain_config(config: dict[str, Any]) -> Any:
    """A plain PretrainedConfig when config.json's model type needs custom code (Grok-1's ``auto_map``), else None.

    Given to AutoTokenizer so it never reads that config.json (which would offer, or refuse, remote code)."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    if "auto_map" not in config or config.get("model_type") in CONFIG_MAPPING:
        return None
    return PretrainedConfig(**({"tokenizer_class": config["tokenizer_class"]} if config.get("tokenizer_class") else {}))


def _from_tokenizer_json(directory: Path, tokenizer_config: dict[str, Any]):  # -> PreTrainedTokenizerFast
    """tokenizer.json with the special tokens of tokenizer_config.json / special_tokens_map.json; no class lookup."""
    from transformers import PreTrainedTokenizerFast

    special = {**_read_json(directory / "special_tokens_map.json"), **tokenizer_config}
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
            "model_max_length", "padding_side", "clean_up_tokenization_spaces", "add_bos_token", "add_eos_token")
    kw = {k: special[k] for k in keys if special.get(k) is not None}
    for k in keys[:7]:  # AddedToken dicts ({"content": ...}) as saved by older transformers
        if isinstance(kw.get(k), dict):
            kw[k] = kw[k].get("content")
    return PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), **kw)


def load_tokenizer(directory: Path):  # -> PreTrainedTokenizerBase
    """The tokenizer of a local directory, offline; never offers or runs the checkpoint's remote code.

    A config.json that names custom code (Grok-1's ``auto_map``) is not read; a tokenizer_config.json whose
    ``auto_map`` names a custom tokenizer class is loaded from tokenizer.json, or refused with a LoadError.
    """
    from transformers import AutoTokenizer

    from qbuild.errors import LoadError, one_line

    directory = Path(directory)
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    custom = _tokenizer_auto_map(tokenizer_config)
    hint = ("qbuild never runs a checkpoint's remote code: put a tokenizer.json (the `tokenizers` format, e.g. "
            "saved by the original tokenizer's save_pretrained) in the directory, or set model.tokenizer to a "
            "directory that has one")
    if custom:
        if (directory / "tokenizer.json").is_file():
            return _from_tokenizer_json(directory, tokenizer_config)
        names = ", ".join(c for c in (custom if isinstance(custom, (list, tuple)) else [custom]) if c)
        raise LoadError(f"model.tokenizer: {directory} needs custom tokenizer code ({names}) and has no "
                        f"tokenizer.json", hint=hint)
    kwargs: dict[str, Any] = {}
    config = _plain_config(_read_json(directory / "config.json"))
    if config is not None:
        kwargs["config"] = config
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False,
                                             **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc) and "custom code" not in str(exc):
            raise
        if (directory / "tokenizer.json").is_file():
            return _from_tokenizer_json(directory, tokenizer_config)
        raise LoadError(f"model.tokenizer: {directory} needs custom code to load its tokenizer: {one_line(exc)}",
                        hint=hint) from exc


# --- the runtime tokenizer ------------------------------------------------------------------------------

RUNTIME_DIR = "tokenizer"  # in the export entry: tokenizer.json + runtime.json (qbuild.runtime.tokenizer reads them)
RUNTIME_FORMAT = 1
#: texts whose ids and decoded text must come out the same through the saved pipeline before it is saved
PROBES = ("hi", "My name is", " leading and  double  spaces, tabs\tand\nnew lines\n",
          "Ünïcödé: héllo wörld, naïve café; 日本語のテキスト; emoji 🤖👍🏽",
          "don't you'll I'm we've they're isn't .,?! ' quoted '",
          "1234567890 3.14159 $100 #tag @user http://example.com/a?b=c")
#: methods whose transformers versions the saved pipeline reproduces; a class overriding one is not saved
_REPRODUCED = ("__call__", "_encode_plus", "encode", "decode", "_decode", "convert_tokens_to_string")


def _overridden(tok: Any) -> list[str]:
    """The encode/decode methods ``tok``'s class overrides from transformers' TokenizersBackend."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return [n for n in _REPRODUCED if getattr(type(tok), n, None) is not getattr(TokenizersBackend, n, None)]


def _cleans_up(tok: Any) -> bool:
    """Whether transformers' decode applies ``clean_up_tokenization`` (it never does for a BPE model)."""
    if not tok.clean_up_tokenization_spaces:
        return False
    forced = getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    return type(tok.backend_tokenizer.model).__name__ != "BPE" or bool(forced)


def save_runtime_tokenizer(tok: Any, out_dir: Path, eos_token_id: int | list[int] | None) -> str | None:
    """Save the ``tokenizers`` pipeline of the transformers tokenizer ``tok`` (as transformers configured it:
    post-processor with BOS/EOS, added special tokens) and the facts the runtime needs into ``out_dir``.

    Saved only when that pipeline gives exactly transformers' ids and decoded text on :data:`PROBES` (and the
    special tokens); else nothing is written and the reason is returned (the runtime then uses transformers)."""
    if getattr(tok, "backend_tokenizer", None) is None:
        return f"{type(tok).__name__} has no `tokenizers` backend (a slow tokenizer)"
    if overridden := _overridden(tok):
        return f"{type(tok).__name__} overrides {', '.join(overridden)}"
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    backend.encode_special_tokens = bool(tok.split_special_tokens)
    cleans_up = _cleans_up(tok)
    texts = [*PROBES, " ".join(str(t) for t in tok.all_special_tokens) + " end"]
    for text in texts:
        want = list(tok(text)["input_ids"])
        ids = backend.encode(text, add_special_tokens=True).ids
        got = backend.decode(ids, skip_special_tokens=True)
        if ids != want or (clean_up(got) if cleans_up else got) != tok.decode(want, skip_special_tokens=True):
            return f"the saved pipeline differs from transformers on {text!r}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend.save(str(out_dir / "tokenizer.json"))
    facts = {"format": RUNTIME_FORMAT, "class": type(tok).__name__, "add_special_tokens": True,
             "split_special_tokens": bool(tok.split_special_tokens), "clean_up_tokenization_spaces": cleans_up,
             "eos_token_id": eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    (out_dir / "runtime.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return None


def clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (spaces before punctuation and contractions)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text

"""Tokenizers without a hub: a byte-level BPE trained in-process with vocab = model vocab."""

from __future__ import annotations

from pathlib import Path

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
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet (259)")
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    lines = _CORPUS.splitlines() * 4
    tok.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=1, show_progress=False,
                            special_tokens=SPECIALS)
    short = vocab_size - tok.get_vocab_size()
    if short > 0:  # the corpus ran out of merges: fill with reserved tokens so ids match the model
        tok.add_special_tokens([AddedToken(f"<reserved_{i}>", special=True) for i in range(short)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return {"vocab_size": len(fast), "pad_token_id": fast.pad_token_id, "eos_token_id": fast.eos_token_id}


def load_tokenizer(directory: Path):  # -> PreTrainedTokenizerBase
    """AutoTokenizer from a local directory, offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

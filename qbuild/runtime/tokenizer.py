"""The tokenizer of ``qbuild run``: ids and text exactly as transformers gives them, without importing it.

The export of a KV causal LM saves ``tokenizer/`` beside the graph (qbuild.models.tokenizer.save_runtime_tokenizer):
the ``tokenizers`` pipeline transformers built for the model's tokenizer (its post-processor adds BOS/EOS as
transformers does, its added tokens say which are special) and ``runtime.json`` (EOS ids of the generation
config, whether decode cleans up spaces). :func:`open_tokenizer` loads that with ``tokenizers`` alone; where the
export saved none (a slow-only tokenizer, a class with its own encode/decode), it falls back to transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from qbuild.errors import RunError, one_line
from qbuild.models.tokenizer import RUNTIME_DIR, RUNTIME_FORMAT, clean_up

EosIds = int | list[int] | None


class RunTokenizer(Protocol):
    """What generation needs from a tokenizer."""

    kind: str  # "tokenizers" or "transformers"
    eos_token_id: EosIds

    def encode(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class FastTokenizer:
    """The saved ``tokenizers`` pipeline: ``encode`` = transformers' ``tok(text)["input_ids"]``, ``decode`` =
    ``tok.decode(ids, skip_special_tokens=True)``."""

    kind = "tokenizers"

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        facts = json.loads((directory / "runtime.json").read_text(encoding="utf-8"))
        if facts.get("format") != RUNTIME_FORMAT:
            raise RunError(f"{directory}: runtime tokenizer format {facts.get('format')}, expected {RUNTIME_FORMAT}",
                           hint="rebuild the export (qbuild MANIFEST --cache=redo)")
        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._tok.encode_special_tokens = bool(facts["split_special_tokens"])
        self._add_special = bool(facts["add_special_tokens"])
        self._clean_up = bool(facts["clean_up_tokenization_spaces"])
        self.eos_token_id: EosIds = facts.get("eos_token_id")

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=self._add_special)]

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=True)
        return clean_up(text) if self._clean_up else text


class TransformersTokenizer:
    """The fallback: transformers' tokenizer of the directory (imports transformers and torch)."""

    kind = "transformers"

    def __init__(self, tokenizer_dir: Path, model_dir: Path) -> None:
        from qbuild.models.tokenizer import load_tokenizer

        self._tok = load_tokenizer(tokenizer_dir)
        self.eos_token_id = generation_eos(model_dir)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(self._tok(t)["input_ids"]) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def generation_eos(model_dir: Path) -> EosIds:
    """EOS ids as HF generate takes them: generation_config.json's, else config.json's."""
    for name in ("generation_config.json", "config.json"):
        try:
            data: Any = json.loads((Path(model_dir) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("eos_token_id") is not None:
            return data["eos_token_id"]
    return None


def open_tokenizer(export_dir: Path | None, tokenizer_dir: Path, model_dir: Path) -> RunTokenizer:
    """The export's saved runtime tokenizer, else transformers' tokenizer (the export meta's ``runtime_tokenizer``
    says why it saved none)."""
    saved = Path(export_dir) / RUNTIME_DIR if export_dir is not None else None
    if saved is not None and (saved / "runtime.json").is_file():
        try:
            return FastTokenizer(saved)
        except RunError:
            raise
        except Exception as exc:
            raise RunError(f"cannot read the runtime tokenizer in {saved}: {one_line(exc)}",
                           hint="rebuild the export (qbuild MANIFEST --cache=redo)") from exc
    return TransformersTokenizer(tokenizer_dir, model_dir)

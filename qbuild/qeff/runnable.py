"""A compiled artifact, ready to run: greedy generation for KV causal LMs, embeddings for encoders.

:func:`qbuild.load` returns one (from a build or from an artifact directory), and the QEFF classes run
through it, so the API and ``qbuild run`` / ``qbuild embed`` use the same runtime
(``qbuild.runtime``) on the backend recorded in the artifact.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import RunError

if TYPE_CHECKING:
    import numpy as np

    from qbuild.execute.executor import BuildResult
    from qbuild.manifest import ComposedManifest


@dataclass
class ExecInfo:
    """What a causal-LM ``generate`` returns (QEfficient's ``CloudAI100ExecInfo``): per prompt, the new
    token ids and their text, with timings in ``perf_metrics``."""

    batch_size: int
    generated_ids: list[list[int]]
    generated_texts: list[str]
    perf_metrics: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        m = self.perf_metrics
        return (f"ExecInfo(batch_size={self.batch_size}, generated_texts={self.generated_texts!r}, "
                f"prefill_time={m.get('prefill_time', 0):.4f}s, decode_perf={m.get('decode_perf', 0):.2f} tok/s)")


@dataclass
class CompiledModel:
    """A compiled artifact and what running it needs (tokenizer, context, buckets)."""

    artifact: Path  # the compiled artifact directory (holds artifact.json)
    task: str  # causal_lm_kv, causal_lm or embedding
    tokenizer_dir: Path | None = None
    model_dir: Path | None = None  # generation_config.json / config.json: the EOS ids
    export_dir: Path | None = None  # the export's saved runtime tokenizer (causal LMs)
    overflow: str = "error"
    _release: Any = field(default=None, repr=False, compare=False)

    def holding(self, release: Callable[[], None]) -> CompiledModel:
        """Keep the build's cache entries held (against ``qbuild cache gc`` / ``rm``) while this model lives:
        ``release`` runs at :meth:`close`, at the end of a ``with`` block, or when the model is collected."""
        self._release = weakref.finalize(self, release)
        return self

    def close(self) -> None:
        """Release the cache entries this model reads (it still runs, but gc or rm may now remove them)."""
        if self._release is not None:
            self._release()

    def __enter__(self) -> CompiledModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_build(cls, composed: ComposedManifest, result: BuildResult) -> CompiledModel:
        """The artifact of a finished build of ``composed``."""
        if "compiled" not in result.artifacts:
            raise RunError(f"{composed.name}: the build has no compiled artifact", hint="build every stage")
        artifact = Path(result.artifacts["compiled"])
        onnx = result.artifacts.get("onnx")
        return cls(artifact, _task(artifact), Path(result.tokenizer_dir) if result.tokenizer_dir else None,
                   Path(result.model_dir) if result.model_dir else None, Path(onnx).parent if onnx else None,
                   composed.manifest.seq.overflow)

    @classmethod
    def from_dir(cls, directory: Path) -> CompiledModel:
        """A compiled artifact directory, or a bundle (``compiled/`` beside ``tokenizer/``)."""
        directory = Path(directory)
        if not (directory / "artifact.json").is_file() and (directory / "compiled" / "artifact.json").is_file():
            directory = directory / "compiled"
        tok = directory.parent / "tokenizer"
        tok_dir = tok if tok.is_dir() else None
        return cls(directory, _task(directory), tok_dir, tok_dir)

    # --- causal LMs ----------------------------------------------------------------------------------

    def specializations(self) -> list[dict[str, Any]]:
        from qbuild.runtime import artifact_record

        specs = artifact_record(self.artifact).get("options", {}).get("specializations") or []
        return [s.get("symbols", s) for s in specs]

    def generate(self, tokenizer: Any = None, prompts: str | Sequence[str] = (), *,
                 generation_len: int | None = None,
                 prompt_to_adapter_mapping: Sequence[str] | None = None) -> ExecInfo:
        """Greedy tokens for each prompt (a KV causal LM). ``tokenizer``: a transformers tokenizer (None: the
        build's); ``generation_len``: new tokens at most (default: what the context leaves);
        ``prompt_to_adapter_mapping``: the LoRA adapter of each prompt (``model.adapters`` names, ``base``),
        as QEfficient's multi-adapter ``generate``."""
        if self.task != "causal_lm_kv":
            raise RunError(f"{self.artifact}: generate needs a KV-cache causal LM, this artifact is {self.task}",
                           hint="encoders: use encode(inputs) or embed(texts)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise RunError("generate: no prompts")
        encode, decode, eos = self._tokenizer(tokenizer)
        ids = encode(prompts)
        specs = self.specializations()
        ctx_len = int(specs[0]["ctx_len"])
        buckets = sorted({int(s["seq_len"]) for s in specs if int(s["seq_len"]) > 1} or {1})
        longest = max(len(x) for x in ids)
        if generation_len is None:
            generation_len = ctx_len - longest
        if not isinstance(generation_len, int) or isinstance(generation_len, bool) or generation_len < 1:
            raise RunError(f"generation_len must be a positive int, got {generation_len!r}",
                           hint=f"at most ctx_len ({ctx_len}) - the longest prompt ({longest} tokens)")
        from qbuild.runtime.generate import open_runtime
        from qbuild.runtime.lora import adapter_ids, known_adapters

        lora_ids = adapter_ids(known_adapters(self.export_dir), list(prompt_to_adapter_mapping or ()), len(ids))
        rt = open_runtime(self.artifact, ctx_len=ctx_len, buckets=buckets)
        t0 = time.perf_counter()
        g = rt.generate(ids, generation_len, eos, lora_ids=lora_ids)
        total = time.perf_counter() - t0
        new = sum(len(t) for t in g.tokens)
        perf = {"prefill_time": g.prefill_s, "decode_time": g.decode_s, "total_time": total,
                "decode_perf": g.decode_steps * len(ids) / g.decode_s if g.decode_s else 0.0,
                "total_perf": new / total if total else 0.0}
        return ExecInfo(len(ids), g.tokens, [decode(t) for t in g.tokens], perf)

    def _tokenizer(self, tokenizer: Any) -> tuple[Any, Any, Any]:
        """(encode texts -> ids, decode ids -> text, EOS ids) of the given or the build's tokenizer."""
        from qbuild.runtime.tokenizer import generation_eos, open_tokenizer

        eos = generation_eos(self.model_dir) if self.model_dir is not None else None
        if tokenizer is None:
            if self.tokenizer_dir is None:
                raise RunError(f"{self.artifact}: no tokenizer is known for this artifact",
                               hint="pass a tokenizer: generate(tokenizer, prompts)")
            tok = open_tokenizer(self.export_dir, self.tokenizer_dir, self.model_dir or self.tokenizer_dir)
            return tok.encode, tok.decode, tok.eos_token_id if eos is None else eos
        if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise RunError(f"generate: tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")

        def encode(texts: list[str]) -> list[list[int]]:
            return [list(tokenizer(t)["input_ids"]) for t in texts]

        def decode(ids: list[int]) -> str:
            return str(tokenizer.decode(ids, skip_special_tokens=True))

        return encode, decode, getattr(tokenizer, "eos_token_id", None) if eos is None else eos

    # --- encoders ------------------------------------------------------------------------------------

    def encode(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """The pooled output ``[batch, hidden]`` (token embeddings ``[batch, seq, hidden]``, padding zeroed,
        with ``pooling: none``) of tokenised inputs: a dict of ``input_ids`` (and ``attention_mask``) as
        tensors, arrays or lists, or a transformers ``BatchEncoding``."""
        import numpy as np

        self._encoder()
        if not hasattr(inputs, "keys") or "input_ids" not in inputs:
            raise RunError("generate: inputs must be a mapping with input_ids (and attention_mask), e.g. "
                           "tokenizer(texts, return_tensors='pt')")
        ids = _array(inputs["input_ids"])
        mask = _array(inputs["attention_mask"]) if inputs.get("attention_mask") is not None else np.ones_like(ids)
        if ids.ndim == 1:
            ids, mask = ids[None], mask[None]
        if ids.shape != mask.shape:
            raise RunError(f"generate: input_ids {ids.shape} and attention_mask {mask.shape} differ in shape")
        rows = [ids[r][mask[r] != 0].tolist() for r in range(ids.shape[0])]
        out = self._embedder(None).run(rows)
        if out and out[0].ndim == 1:
            return np.stack(out)
        tokens = np.zeros((ids.shape[0], ids.shape[1], out[0].shape[-1]), dtype=out[0].dtype)
        for r, x in enumerate(out):
            tokens[r, mask[r] != 0] = x
        return tokens

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` with the build's tokenizer, as ``qbuild embed`` gives them."""
        self._encoder()
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._embedder(self.tokenizer_dir).embed(texts)

    def _encoder(self) -> None:
        if self.task != "embedding":
            raise RunError(f"{self.artifact}: an encoder's inputs go to an embedding artifact, this one is "
                           f"{self.task}", hint="causal LMs: generate(tokenizer, prompts)")

    def _embedder(self, tokenizer_dir: Path | None) -> Any:
        from qbuild.runtime.embed import Embedder

        return Embedder(self.artifact, tokenizer_dir, overflow=self.overflow)


def _task(artifact: Path) -> str:
    from qbuild.runtime import artifact_record

    return str(artifact_record(artifact).get("task", ""))


def _array(value: Any) -> np.ndarray:
    import numpy as np

    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.int64)

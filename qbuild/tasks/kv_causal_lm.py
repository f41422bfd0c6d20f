"""Causal LM with the retained-state KV cache: Prefill buckets + Decode; verified by greedy tokens."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import VerifyError
from qbuild.manifest.schema import Manifest
from qbuild.tasks import Task

if TYPE_CHECKING:
    from qbuild.stages.base import StageContext


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


class KVCausalLMTask(Task):
    name = "causal_lm_kv"

    def export(self, model: Any, out: Path, m: Manifest) -> dict[str, Any]:
        from qbuild.exporters.kv_causal_lm import export_kv_causal_lm

        return export_kv_causal_lm(model, out, exporter=m.export.exporter, opset=m.export.opset,
                                   ctx_len=m.seq.ctx_len, batch_size=m.seq.batch_size)

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        """One Prefill per bucket, then Decode (seq_len 1), as QEfficient compiles them."""
        b, ctx = m.seq.batch_size, m.seq.ctx_len
        prefill = [n for n in m.seq.lengths if n > 1]
        specs = [{"name": name, "symbols": {"batch_size": b, "seq_len": n, "ctx_len": ctx}}
                 for name, n in zip(_names("Prefill", len(prefill)), prefill, strict=True)]
        return [*specs, {"name": "Decode", "symbols": {"batch_size": b, "seq_len": 1, "ctx_len": ctx}}]

    def verify_params(self, m: Manifest) -> dict[str, Any]:
        v = m.verify
        return {"verify.prompts": list(v.prompts), "verify.max_new_tokens": v.max_new_tokens,
                "seq.lengths": list(m.seq.lengths), "seq.ctx_len": m.seq.ctx_len}

    def verify(self, ctx: StageContext, compiled: Path) -> dict[str, Any]:
        """Greedy tokens of the compiled artifact must equal HF ``generate(do_sample=False)``."""
        from qbuild.runtime.generate import open_runtime

        m, v = ctx.manifest, ctx.manifest.verify
        tokenizer, hf = reference_model(ctx)
        prompts = [tokenizer(p)["input_ids"] for p in v.prompts]
        ctx.progress(f"HF generate: {len(prompts)} prompts x {v.max_new_tokens} tokens", None)
        expected = [hf_greedy(hf, ids, v.max_new_tokens, tokenizer) for ids in prompts]
        ctx.progress("generate with the compiled artifact", None)
        runtime = open_runtime(compiled, ctx_len=m.seq.ctx_len, buckets=m.seq.lengths)
        generation = runtime.generate(prompts, v.max_new_tokens, hf.generation_config.eos_token_id)
        got = generation.tokens
        for text, want, have in zip(v.prompts, expected, got, strict=True):
            if want != have:
                at = first_difference(want, have)
                raise VerifyError(f"greedy tokens differ from HF generate for prompt {text!r} at new token {at}: "
                                  f"expected {want[at:at + 4]}..., got {have[at:at + 4]}...",
                                  hint="compare `qbuild run` output with transformers generate on the same weights")
        return {"prompts": list(v.prompts), "max_new_tokens": v.max_new_tokens, "tokens": got,
                "prompt_tokens": [len(p) for p in prompts], "buckets": runtime.buckets,
                "prefill_chunks": generation.chunks}


def reference_model(ctx: StageContext) -> tuple[Any, Any]:
    """The tokenizer and the untransformed HF model on the same weights."""
    from qbuild.models.source import load_model
    from qbuild.models.tokenizer import load_tokenizer

    m = ctx.manifest.model
    return load_tokenizer(ctx.tokenizer_dir()), load_model(ctx.model_dir(), "causal_lm", m.dtype)


def hf_greedy(model: Any, ids: list[int], max_new_tokens: int, tokenizer: Any) -> list[int]:
    """New tokens of ``generate(do_sample=False)`` for one prompt (EOS included when reached)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return out[0, len(ids):].tolist()


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length if one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

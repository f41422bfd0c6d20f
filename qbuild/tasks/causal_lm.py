"""Causal LM without a KV cache: ``logits`` from ``input_ids`` + ``attention_mask`` (dynamic batch, seq)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.manifest.schema import Manifest
from qbuild.tasks import Task

if TYPE_CHECKING:
    from qbuild.stages.base import StageContext


class CausalLMTask(Task):
    name = "causal_lm"

    def export(self, model: Any, out: Path, m: Manifest) -> dict[str, Any]:
        from qbuild.exporters.causal_lm import export_causal_lm

        return export_causal_lm(model, out, exporter=m.export.exporter, opset=m.export.opset)

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        b = m.seq.batch_size
        return [{"name": f"Seq_{n}", "symbols": {"batch": b, "seq": n}} for n in m.seq.lengths]

    def verify_params(self, m: Manifest) -> dict[str, Any]:
        v = m.verify
        return {**super().verify_params(m), "verify.batch_size": v.batch_size, "verify.seq_len": v.seq_len}

    def verify(self, ctx: StageContext, compiled: Path) -> dict[str, Any]:
        from qbuild.backends.onnxruntime import open_session
        from qbuild.verify.causal_lm import verify_causal_lm

        v, model = ctx.manifest.verify, ctx.model()
        ctx.progress("comparing ONNX Runtime logits with PyTorch", None)
        return verify_causal_lm(model, open_session(compiled), batch_size=v.batch_size, seq_len=v.seq_len,
                                seed=v.seed, atol=self.atol(ctx.manifest), vocab_size=model.config.vocab_size)

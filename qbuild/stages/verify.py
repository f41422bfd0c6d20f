"""verify: compiled artifact vs the PyTorch model on fixed inputs; a mismatch publishes nothing."""

from __future__ import annotations

import json
from typing import Any

from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Stage, StageContext


class VerifyStage(Stage):
    name = "verify"
    version = 1
    tools = ("qbuild", "torch", "transformers", "onnxruntime")
    upstream = ("compile",)

    def params(self, m: Manifest) -> dict[str, Any]:
        v = m.verify
        return {"verify.atol": v.atol, "verify.batch_size": v.batch_size, "verify.seq_len": v.seq_len,
                "verify.seed": v.seed}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from qbuild.backends.onnxruntime import open_session
        from qbuild.verify.causal_lm import verify_causal_lm

        v = ctx.manifest.verify
        model = ctx.model()
        session = open_session(ctx.inputs["compile"].out)
        ctx.progress("comparing ONNX Runtime logits with PyTorch", None)
        report = verify_causal_lm(model, session, batch_size=v.batch_size, seq_len=v.seq_len, seed=v.seed,
                                  atol=v.atol, vocab_size=model.config.vocab_size)
        (ctx.out / "verify.json").write_text(json.dumps(report, indent=1))
        return {**report, "artifacts": {"report": "verify.json"}}

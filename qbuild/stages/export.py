"""export: the transformed model to ONNX with torch.onnx."""

from __future__ import annotations

from typing import Any

from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Stage, StageContext


class ExportStage(Stage):
    name = "export"
    version = 1
    tools = ("qbuild", "torch", "transformers", "onnx")
    upstream = ("transform",)

    def params(self, m: Manifest) -> dict[str, Any]:
        return {"model.task": m.model.task, "export.exporter": m.export.exporter, "export.opset": m.export.opset}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from qbuild.exporters.causal_lm import export_causal_lm

        model = ctx.model()
        ctx.progress(f"torch.onnx.export ({ctx.manifest.export.exporter})", None)
        info = export_causal_lm(model, ctx.out, exporter=ctx.manifest.export.exporter,
                                opset=ctx.manifest.export.opset)
        return {**info, "artifacts": {"onnx": info["onnx"]}}

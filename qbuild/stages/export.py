"""export: the transformed model to ONNX with torch.onnx, as the task defines the graph."""

from __future__ import annotations

from typing import Any

from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Stage, StageContext
from qbuild.tasks import Task


class ExportStage(Stage):
    name = "export"
    version = 1
    tools = ("qbuild", "torch", "transformers", "onnx")
    upstream = ("transform",)

    def __init__(self, task: Task) -> None:
        self.task = task

    def params(self, m: Manifest) -> dict[str, Any]:
        return {"task": f"{self.task.name}/{self.task.version}", "export.exporter": m.export.exporter,
                "export.opset": m.export.opset, **self.task.export_params(m)}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        model = ctx.model()
        ctx.progress(f"torch.onnx.export ({ctx.manifest.export.exporter})", None)
        info = self.task.export(model, ctx.out, ctx.manifest)
        return {**info, "artifacts": {"onnx": info["onnx"]}}

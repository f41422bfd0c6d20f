"""export: the model, rewritten in memory by ``transforms.apply``, to ONNX as its task defines the graph.

The rewrites are part of this step (they are cheap and deterministic; publishing a rewritten PyTorch
model would double the cache's size for nothing): the stage list is load -> export -> compile -> verify,
and the transforms, their versions and their code are in this stage's key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qbuild.manifest.schema import Manifest
from qbuild.plan.keys import fingerprints
from qbuild.stages.base import ModelRef, Resolved, Stage, StageContext
from qbuild.stages.load import rewritten_model
from qbuild.store import StatCache
from qbuild.tasks import Task


@dataclass(frozen=True)
class ExportParams:
    task: str
    model: ModelRef  # with the transforms applied before export
    exporter: str
    opset: int
    options: Any = None  # the task's own export options (a frozen dataclass), e.g. pooling


class ExportStage(Stage):
    name = "export"
    upstream = ("load",)
    tools = ("torch", "transformers", "onnx", "onnxscript")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.code = ("stages/export.py", "stages/base.py", "transforms/**/*.py", "models/*.py", *task.code)

    def resolve(self, m: Manifest, stats: StatCache) -> Resolved:
        p = ExportParams(self.task.name, rewritten_model(m), m.export.exporter, m.export.opset,
                         self.task.export_options(m))
        return Resolved(p, tools=fingerprints(self.tools))

    def describe(self, p: ExportParams) -> list[str]:
        rewrites = ", ".join(p.model.transforms) or "none"
        return [f"export: transforms [{rewrites}] in memory, then torch.onnx ({p.exporter}, opset {p.opset}) "
                f"as task {p.task}"]

    def run(self, p: ExportParams, ctx: StageContext) -> dict[str, Any]:
        model = ctx.model(p.model)
        report = {"architecture": type(model).__name__,
                  "num_parameters": sum(x.numel() for x in model.parameters()),
                  "transforms": ctx.transform_report(p.model)}
        (ctx.out / "transform.json").write_text(json.dumps(report, indent=1))
        ctx.progress(f"torch.onnx.export ({p.exporter})", None)
        info = self.task.export(model, ctx.out, p, ctx)
        del model
        ctx.forget(p.model)  # compile never needs it; verify loads it again if it does
        return {**info, "transform": report, "artifacts": {"onnx": info["onnx"]}}

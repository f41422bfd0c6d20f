"""verify: compiled artifact vs the PyTorch model, as the task defines it; a mismatch publishes nothing."""

from __future__ import annotations

import json
from typing import Any

from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Stage, StageContext
from qbuild.tasks import Task


class VerifyStage(Stage):
    name = "verify"
    version = 1
    tools = ("qbuild", "torch", "transformers", "onnxruntime")
    upstream = ("compile",)

    def __init__(self, task: Task) -> None:
        self.task = task

    def params(self, m: Manifest) -> dict[str, Any]:
        return self.task.verify_params(m)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        report = self.task.verify(ctx, ctx.inputs["compile"].out)
        (ctx.out / "verify.json").write_text(json.dumps(report, indent=1))
        return {**report, "artifacts": {"report": "verify.json"}}

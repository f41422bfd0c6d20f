"""compile: the ONNX graph to a backend artifact, one specialisation per sequence-length bucket."""

from __future__ import annotations

from typing import Any

from qbuild.backends import Backend
from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Stage, StageContext
from qbuild.tasks import Task


class CompileStage(Stage):
    name = "compile"
    version = 1
    upstream = ("export",)

    def __init__(self, backend: Backend, task: Task) -> None:
        self.backend, self.task = backend, task
        self.tools = backend.tools

    def params(self, m: Manifest) -> dict[str, Any]:
        return {**self.backend.params(m, self.task), "specializations": self.task.specializations(m)}

    def fingerprint(self, m: Manifest) -> dict[str, str]:
        return {**super().fingerprint(m), **self.backend.fingerprint(m)}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        export = ctx.inputs["export"]
        info = self.backend.compile(ctx, export.out / export.meta["onnx"], self.task)
        return {**info, "artifacts": {"compiled": "."}}

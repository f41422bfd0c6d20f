"""The ONNX Runtime backend as a ``Backend`` (runs everywhere; what the tests execute)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.backends import Backend
from qbuild.manifest.schema import Manifest

if TYPE_CHECKING:
    from qbuild.stages.base import StageContext
    from qbuild.tasks import Task


class OrtBackend(Backend):
    name = "onnxruntime"
    tools = ("qbuild", "onnx", "onnxruntime")

    def params(self, m: Manifest, task: Task) -> dict[str, Any]:
        c = m.compile
        return {"compile.backend": self.name, "compile.num_cores": c.num_cores,
                "compile.graph_optimization": c.graph_optimization}

    def explain(self, m: Manifest, task: Task) -> list[str]:
        c = m.compile
        return [f"onnxruntime: CPUExecutionProvider, {c.num_cores} threads, {c.graph_optimization} "
                "graph optimisation, saved offline"]

    def compile(self, ctx: StageContext, onnx: Path, task: Task) -> dict[str, Any]:
        from qbuild.backends.onnxruntime import compile_onnx

        c = ctx.manifest.compile
        ctx.progress("optimising with ONNX Runtime", None)
        return compile_onnx(onnx, ctx.out, num_cores=c.num_cores, graph_optimization=c.graph_optimization)

"""compile: the ONNX graph to a backend artifact (ONNX Runtime today; qaic in issue 5)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qbuild.errors import PlanError
from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Stage, StageContext

QAIC_SDK_DIR = Path(os.environ.get("QAIC_SDK_DIR", "/opt/qti-aic"))


def qaic_compiler() -> Path | None:
    """The Cloud AI 100 compiler if the SDK is installed."""
    for name in ("qaic-compile", "qaic-exec"):
        path = QAIC_SDK_DIR / "exec" / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def resolve_backend(m: Manifest) -> tuple[str, str]:
    """(backend, why) for ``compile.backend``, checking what this machine has."""
    wanted = m.compile.backend
    compiler = qaic_compiler()
    if wanted == "onnxruntime":
        return "onnxruntime", "compile.backend: onnxruntime"
    if wanted == "auto":
        if compiler is not None:
            return "qaic", f"compile.backend: auto, Cloud AI 100 SDK found ({compiler})"
        return "onnxruntime", f"compile.backend: auto, no Cloud AI 100 SDK at {QAIC_SDK_DIR}/exec"
    looked = f"{QAIC_SDK_DIR}/exec/qaic-compile or qaic-exec"
    if compiler is None:
        raise PlanError(f"compile.backend: qaic needs the Cloud AI 100 SDK; looked for {looked}",
                        hint="set QAIC_SDK_DIR, or build for CPU with compile=onnxruntime")
    raise PlanError("compile.backend: qaic is not implemented yet in this qbuild version",
                    hint="use compile=onnxruntime")


class CompileStage(Stage):
    name = "compile"
    version = 1
    tools = ("qbuild", "onnx", "onnxruntime")
    upstream = ("export",)

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def params(self, m: Manifest) -> dict[str, Any]:
        c = m.compile
        return {"compile.backend": self.backend, "compile.num_cores": c.num_cores,
                "compile.graph_optimization": c.graph_optimization}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from qbuild.backends.onnxruntime import compile_onnx

        export = ctx.inputs["export"]
        c = ctx.manifest.compile
        ctx.progress("optimising with ONNX Runtime", None)
        info = compile_onnx(export.out / export.meta["onnx"], ctx.out, num_cores=c.num_cores,
                            graph_optimization=c.graph_optimization)
        return {**info, "artifacts": {"compiled": "."}}

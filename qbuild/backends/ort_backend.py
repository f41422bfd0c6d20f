"""The ONNX Runtime backend as a ``Backend`` (runs everywhere; what the tests execute)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.backends import Backend, ort_quantize
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
                "compile.graph_optimization": c.graph_optimization, "compile.session": c.session,
                "compile.quantize": c.quantize,
                **({"quantize_version": ort_quantize.VERSION} if c.quantize != "none" else {})}

    def explain(self, m: Manifest, task: Task) -> list[str]:
        c = m.compile
        lines = [f"onnxruntime: CPUExecutionProvider, {c.num_cores} threads, {c.graph_optimization} "
                 "graph optimisation, saved offline"]
        if c.quantize != "none":
            kind = "dynamic int8 (MatMulInteger)" if c.quantize == "int8" else "int4 MatMulNBits, block 32"
            lines.append(f"onnxruntime: weights quantised to {kind} before optimisation")
        specs = task.specializations(m)
        if specs:
            how = {"auto": "fixed-shape or dynamic sessions, chosen by measurement",
                   "fixed": "one fixed-shape session each", "dynamic": "one dynamic session"}[c.session]
            names = ", ".join(f"{s['name']} {s['symbols']}" for s in specs)
            lines.append(f"onnxruntime: {len(specs)} specialisations ({names}): {how}")
        return lines

    def compile(self, ctx: StageContext, onnx: Path, task: Task) -> dict[str, Any]:
        from qbuild.backends.onnxruntime import compile_onnx

        m = ctx.manifest
        c, specs = m.compile, task.specializations(m)
        with tempfile.TemporaryDirectory(dir=ctx.out.parent) as tmp:
            quant: dict[str, Any] = {}
            if c.quantize != "none":
                from qbuild.backends.ort_quantize import quantize

                ctx.progress(f"quantising weights ({c.quantize})", None)
                quant = quantize(onnx, Path(tmp) / "model.onnx", c.quantize)
                onnx = Path(tmp) / "model.onnx"
            ctx.progress("optimising with ONNX Runtime", None)
            if specs and c.session == "auto":
                ctx.progress(f"measuring fixed-shape vs dynamic sessions on {len(specs)} specialisations", None)
            info = compile_onnx(onnx, ctx.out, num_cores=c.num_cores, graph_optimization=c.graph_optimization,
                                specializations=specs, session=c.session,
                                sample_inputs=lambda symbols: task.sample_inputs(m, symbols))
        return {**info, **({"quantization": quant} if quant else {})}

"""The stage graph of an image-text-to-text manifest: two branches from one load, joined by verify::

    load -> export_vision -> compile_vision --.
         `-> export -------> compile --------->+-> verify

Each branch has its own stages and keys (stage names are cache namespaces): a decoder bucket
(``seq.lengths``) is read by ``compile`` only, a vision setting (``vlm.vision_batch_size``) by
``compile_vision`` only, so a change rebuilds one branch (and verify).

``vlm.mode: single`` (task ``image_text_to_text_single``): one branch, ``load -> export -> compile -> verify``,
the vision encoder inside the exported graph (qbuild.tasks.vlm_single).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qbuild.backends import Backend
from qbuild.errors import ManifestError
from qbuild.manifest.schema import Manifest
from qbuild.plan.keys import fingerprints
from qbuild.runtime import ARTIFACT_FILE
from qbuild.stages.base import Resolved, Stage, StageContext
from qbuild.stages.compile import CompileStage
from qbuild.stages.export import ExportParams, ExportStage
from qbuild.stages.load import LoadParams, LoadStage, _thaw
from qbuild.stages.verify import VerifyStage
from qbuild.store import StatCache
from qbuild.tasks import Task

_VLM_CODE = ("stages/vlm.py", "vlm/*.py")


def vlm_stages(m: Manifest, backend: Backend, task: Task) -> list[Stage]:
    """The stages of a VLM manifest, in an order that runs each after its upstream."""
    from qbuild.tasks import get_task
    from qbuild.vlm import vision_facts

    if m.transforms.apply:
        raise ManifestError(f"transforms.apply: {list(m.transforms.apply)}: an image-text-to-text build applies "
                            "kv_cache to its language decoder itself and takes no other rewrites",
                            key="transforms.apply", hint="drop transforms (transforms=none)")
    vision_facts(m)  # an unsupported model fails at plan time
    if task.name == "image_text_to_text_single":  # vlm.mode single: one program
        single: list[Stage] = [VLMLoadStage(), VLMExportStage(task), CompileStage(backend, task)]
        return [*single, VerifyStage(task)] if m.verify.enabled else single
    vision = get_task("vlm_vision")
    verify = VerifyStage(task)
    verify.upstream = ("compile", "compile_vision")  # type: ignore[misc]
    stages: list[Stage] = [VLMLoadStage(), VisionExportStage(vision), VisionCompileStage(backend, vision),
                           VLMExportStage(task), CompileStage(backend, task)]
    return [*stages, verify] if m.verify.enabled else stages


class VLMLoadStage(LoadStage):
    """load, where ``init: random`` also builds the family's processor (tokenizer, image processor)."""

    code = (*LoadStage.code, *_VLM_CODE)

    def run(self, p: LoadParams, ctx: StageContext) -> dict[str, Any]:
        if not p.model.random:
            return super().run(p, ctx)
        from qbuild.vlm.model import init_random

        assert p.architecture is not None
        ctx.progress("initialising random weights and the processor", None)
        config = {"model_type": p.architecture, **_thaw(p.config)}
        info = init_random(config, p.seed, p.model.dtype, ctx.out / "model")
        return {"source": "random", **info, "artifacts": {"model": "model"}}


class VLMExportStage(ExportStage):
    """export of the language decoder (the VLM is loaded once per build and shared with export_vision)."""

    def __init__(self, task: Task) -> None:
        super().__init__(task)
        self.code = (*self.code, *_VLM_CODE)

    def run(self, p: ExportParams, ctx: StageContext) -> dict[str, Any]:
        from qbuild.tasks.vlm import _memo_vlm

        model = _memo_vlm(ctx, p)
        ctx.progress(f"torch.onnx.export ({p.exporter}) of the {self.name.replace('_', ' ')}", None)
        info = self.task.export(model, ctx.out, p, ctx)
        return {**info, "artifacts": {self.artifact: info["onnx"]}}

    artifact = "onnx"


class VisionExportStage(VLMExportStage):
    name = "export_vision"
    artifact = "vision_onnx"

    def resolve(self, m: Manifest, stats: StatCache) -> Resolved:
        resolved = super().resolve(m, stats)
        return replace(resolved, params=replace(resolved.params, options=None))


class VisionCompileStage(CompileStage):
    name = "compile_vision"
    upstream = ("export_vision",)

    def __init__(self, backend: Backend, task: Task) -> None:
        super().__init__(backend, task)
        self.code = (*self.code, *_VLM_CODE)

    def resolve(self, m: Manifest, stats: StatCache) -> Resolved:
        options = self.backend.resolve(m, self.task, stats)
        return Resolved(options, tools={**fingerprints(self.tools), **self.backend.fingerprint(options)})

    def run(self, options: Any, ctx: StageContext) -> dict[str, Any]:
        import json

        from qbuild.plan.params import as_json

        export = ctx.inputs["export_vision"]
        info = self.backend.compile(options, export.out / export.meta["onnx"], export.meta, ctx)
        record = {"backend": self.backend.name, "task": self.task.name, "options": as_json(options)}
        (ctx.out / ARTIFACT_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return {**info, "backend": self.backend.name, "artifacts": {"vision_compiled": "."}}

"""transform: apply the registered module rewrites to the loaded model and record what changed."""

from __future__ import annotations

import json
from typing import Any

from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Stage, StageContext


class TransformStage(Stage):
    name = "transform"
    version = 1
    tools = ("qbuild", "torch", "transformers")
    upstream = ("load",)

    def params(self, m: Manifest) -> dict[str, Any]:
        from qbuild.transforms import transform_versions

        return {"transforms.apply": list(m.transforms.apply),
                "transforms.versions": transform_versions(m.transforms.apply)}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        ctx.progress("loading model", None)
        model = ctx.model()
        report = {
            "architecture": type(model).__name__,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "transforms": ctx.memo["transform_report"],
        }
        (ctx.out / "transform.json").write_text(json.dumps(report, indent=1))
        return report

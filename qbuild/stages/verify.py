"""verify: the compiled artifact, opened by the backend it records, vs the PyTorch model, as the task
defines it; a mismatch publishes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qbuild.manifest.schema import Manifest
from qbuild.plan.keys import fingerprints
from qbuild.stages.base import ModelRef, Resolved, Stage, StageContext, TokenizerRef
from qbuild.stages.load import resolve_model, rewritten_model
from qbuild.store import StatCache
from qbuild.tasks import Task


@dataclass(frozen=True)
class VerifyParams:
    model: ModelRef  # the exported (rewritten) model; reference_model() drops the rewrites where needed
    tokenizer: TokenizerRef
    check: Any  # the task's verify options


class VerifyStage(Stage):
    name = "verify"
    upstream = ("compile",)
    tools = ("torch", "transformers", "onnxruntime")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.code = ("stages/verify.py", "runtime/*.py", *task.code)

    def resolve(self, m: Manifest, stats: StatCache) -> Resolved:
        _model, tok = resolve_model(m)
        p = VerifyParams(rewritten_model(m), tok, self.task.verify_options(m))
        return Resolved(p, tools=fingerprints(self.tools))

    def describe(self, p: VerifyParams) -> list[str]:
        return [f"verify: the artifact against PyTorch: {p.check}"]

    def run(self, p: VerifyParams, ctx: StageContext) -> dict[str, Any]:
        from qbuild.runtime import open_artifact

        artifact = open_artifact(ctx.inputs["compile"].out)
        report = self.task.verify(p, ctx, artifact)
        (ctx.out / "verify.json").write_text(json.dumps(report, indent=1))
        return {**report, "artifacts": {"report": "verify.json"}}

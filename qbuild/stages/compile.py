"""compile: the ONNX graph to a backend artifact, one specialisation per sequence-length bucket.

The backend resolves its own options (its own manifest group, the task's specialisations, the machine:
SDK and hardware) into one frozen object; the key is its digest plus the backend's tools and code, so
a change to the qaic command line does not invalidate ONNX Runtime compiles. The artifact records its
backend (``artifact.json``), which is what opens it later.
"""

from __future__ import annotations

import json
from typing import Any

from qbuild.backends import Backend
from qbuild.manifest.schema import Manifest
from qbuild.plan.keys import fingerprints
from qbuild.plan.params import as_json
from qbuild.runtime import ARTIFACT_FILE
from qbuild.stages.base import Resolved, Stage, StageContext
from qbuild.store import StatCache
from qbuild.tasks import Task


class CompileStage(Stage):
    name = "compile"
    upstream = ("export",)

    def __init__(self, backend: Backend, task: Task) -> None:
        self.backend, self.task = backend, task
        self.tools = backend.tools
        self.code = ("stages/compile.py", "backends/__init__.py", *backend.code, *task.code)

    def resolve(self, m: Manifest, stats: StatCache) -> Resolved:
        options = self.backend.resolve(m, self.task, stats)
        return Resolved(options, tools={**fingerprints(self.tools), **self.backend.fingerprint(options)})

    def describe(self, options: Any) -> list[str]:
        return self.backend.describe(options)

    def run(self, options: Any, ctx: StageContext) -> dict[str, Any]:
        export = ctx.inputs["export"]
        info = self.backend.compile(options, export.out / export.meta["onnx"], export.meta, ctx)
        record = {"backend": self.backend.name, "task": self.task.name, "options": as_json(options)}
        (ctx.out / ARTIFACT_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return {**info, "backend": self.backend.name, "artifacts": {"compiled": "."}}

"""The stage graph for a manifest: load -> export (transforms applied in memory) -> compile -> verify."""

from __future__ import annotations

from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Stage


def stages_for(m: Manifest) -> tuple[list[Stage], list[str]]:
    """The stages, in order, and notes on choices made (the backend). Verify is listed when
    ``verify.enabled``; the planner drops it when the backend says its artifact cannot be verified here."""
    from qbuild.backends import resolve_backend
    from qbuild.plan.params import recording
    from qbuild.stages.compile import CompileStage
    from qbuild.stages.export import ExportStage
    from qbuild.stages.load import LoadStage
    from qbuild.stages.verify import VerifyStage
    from qbuild.tasks import task_for

    view, backend_reads = recording(m)
    backend, why = resolve_backend(view)
    view, task_reads = recording(m)
    task = task_for(view)
    stages: list[Stage] = [LoadStage(), ExportStage(task), CompileStage(backend, task)]
    if m.verify.enabled:
        stages.append(VerifyStage(task))
    for stage in stages[1:]:  # the manifest values that chose the task (and the backend) shape these stages
        stage.selected_by = {**task_reads, **(backend_reads if stage.name == "compile" else {})}
    return stages, [why, *ignored_settings(m, backend.name, task.name)]


def ignored_settings(m: Manifest, backend: str, task: str) -> list[str]:
    """Notes for settings given in the manifest that this build does not use (never dropped silently)."""
    import dataclasses
    import json

    notes = []
    for group in ("onnxruntime", "qaic"):
        if group == backend:
            continue
        spec = getattr(m.compile, group)
        for f in dataclasses.fields(spec):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            value = getattr(spec, f.name)
            if value != default:
                shown = json.dumps(value, default=str)
                notes.append(f"compile.{group}.{f.name}: {shown} is not used: the compile backend is {backend}")
    if backend == "qaic" and m.compile.qaic.mxint8_kv_cache and task != "causal_lm_kv":
        notes.append("compile.qaic.mxint8_kv_cache: not used: this model has no KV cache (add transforms=kv_cache)")
    return notes

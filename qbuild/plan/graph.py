"""The stage graph for a manifest: load -> [finetune] -> export (transforms applied in memory) -> compile -> verify."""

from __future__ import annotations

from typing import Any

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
    if m.finetune.method != "none":  # only then: finetune=none leaves the graph and every key as they were
        from qbuild.stages.finetune import FinetuneStage

        stages.insert(1, FinetuneStage())
        stages[1].selected_by = {"finetune.method": m.finetune.method}  # export on follows it (upstream)
        stages[2].upstream = ("load", "finetune")  # export reads the merged weights
    return stages, [why, *ignored_settings(m, backend.name, task.name)]


def ignored_settings(m: Manifest, backend: str, task: str) -> list[str]:
    """Notes for settings given in the manifest that this build does not use (never dropped silently)."""
    import dataclasses
    import json

    notes = []
    if m.finetune.method == "none":
        notes += [f"finetune.{k}: {json.dumps(v, default=str)} is not used: finetune.method is none"
                  for k, v in _changed_fields(m.finetune).items()]
    for group in ("onnxruntime", "qaic", "qnn"):
        if group == backend:
            continue
        spec = getattr(m.compile, group)
        for f in dataclasses.fields(spec):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            value = getattr(spec, f.name)
            if value != default:
                shown = json.dumps(value, default=str)
                notes.append(f"compile.{group}.{f.name}: {shown} is not used: the compile backend is {backend}")
    if backend in ("qaic", "qnn") and getattr(m.compile, backend).mxint8_kv_cache and task != "causal_lm_kv":
        notes.append(f"compile.{backend}.mxint8_kv_cache: not used: this model has no KV cache "
                     "(add transforms=kv_cache)")
    return notes


def _changed_fields(spec: Any, prefix: str = "") -> dict[str, Any]:
    """The fields of a settings group (nested groups flattened) that differ from their defaults."""
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            out |= _changed_fields(value, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if value != default:
            out[prefix + f.name] = value
    return out

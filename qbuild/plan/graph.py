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
    if task.name.startswith("image_text_to_text"):  # two branches (or one program): qbuild.stages.vlm
        from qbuild.stages.vlm import vlm_stages

        stages = vlm_stages(m, backend, task)
    for stage in stages[1:]:  # the manifest values that chose the task (and the backend) shape these stages
        stage.selected_by = {**task_reads, **(backend_reads if stage.name.startswith("compile") else {})}
    if m.finetune.method != "none":  # only then: finetune=none leaves the graph and every key as they were
        from qbuild.stages.finetune import FinetuneStage

        stages.insert(1, FinetuneStage())
        stages[1].selected_by = {"finetune.method": m.finetune.method}  # export on follows it (upstream)
        stages[2].upstream = ("load", "finetune")  # export reads the merged weights
    if m.model.adapters:  # only then (issue 15): no adapters leaves the graph and every key as they were
        from qbuild.stages.adapters import AdaptersStage

        stages.insert(1, AdaptersStage())
        stages[1].selected_by = {"model.adapters": [dict(a) for a in m.model.adapters]}
        stages[2].upstream = ("load", "adapters")  # export stacks the adapters' weights
    return stages, [why, *ignored_settings(m, backend.name, task.name)]


def ignored_settings(m: Manifest, backend: str, task: str) -> list[str]:
    """Notes for settings given in the manifest that this build does not use (never dropped silently)."""
    import dataclasses
    import json

    notes = []
    if m.finetune.method == "none":
        notes += [f"finetune.{k}: {json.dumps(v, default=str)} is not used: finetune.method is none"
                  for k, v in _changed_fields(m.finetune).items()]
    if not any("seed" in a for a in m.model.adapters):  # model.lora shapes only the random adapters
        why = "model.adapters has no random adapter ({name, seed})" if m.model.adapters else "model.adapters is empty"
        notes += [f"model.lora.{k}: {json.dumps(v, default=str)} is not used: {why}"
                  for k, v in _changed_fields(m.model.lora).items()]
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
    kv_tasks = ("causal_lm_kv", "image_text_to_text", "image_text_to_text_single")  # a VLM's decoder has the KV
    if backend in ("qaic", "qnn") and getattr(m.compile, backend).mxint8_kv_cache and task not in kv_tasks:
        notes.append(f"compile.{backend}.mxint8_kv_cache: not used: this model has no KV cache "
                     "(add transforms=kv_cache)")
    if not task.startswith("image_text_to_text"):
        notes += [f"vlm.{k}: {json.dumps(v, default=str)} is not used: model.task is {m.model.task}, not "
                  "image-text-to-text" for k, v in _changed_fields(m.vlm).items()]
    elif task == "image_text_to_text_single" and m.vlm.vision_batch_size != 1:  # pixel_values take seq.batch_size
        notes.append(f"vlm.vision_batch_size: {m.vlm.vision_batch_size} is not used: vlm.mode single has no vision "
                     "program (its pixel_values take the images of seq.batch_size rows)")
    if task.startswith("image_text_to_text") and m.vlm.max_num_tiles != type(m.vlm)().max_num_tiles:
        from qbuild.vlm import vision_facts

        family = vision_facts(m).family
        if family != "llama4":
            notes.append(f"vlm.max_num_tiles: {m.vlm.max_num_tiles} is not used: {family} does not tile its images "
                         "(only Llama 4 does)")
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

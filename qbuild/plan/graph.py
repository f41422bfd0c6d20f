"""The stage graph for a manifest: load -> transform -> export -> compile -> verify."""

from __future__ import annotations

from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Stage


def stages_for(m: Manifest) -> tuple[list[Stage], list[str]]:
    """The stages to run, in order, and notes on choices made (the backend, a skipped verify)."""
    from qbuild.backends import resolve_backend
    from qbuild.stages.compile import CompileStage
    from qbuild.stages.export import ExportStage
    from qbuild.stages.load import LoadStage
    from qbuild.stages.transform import TransformStage
    from qbuild.stages.verify import VerifyStage
    from qbuild.tasks import task_for

    backend, why = resolve_backend(m)
    task = task_for(m)
    notes = [why]
    stages: list[Stage] = [LoadStage(), TransformStage(), ExportStage(task), CompileStage(backend, task)]
    if not m.verify.enabled:
        pass
    elif not backend.can_execute():
        notes.append(f"verify: skipped, the {backend.name} artifact cannot run on this machine")
    elif backend.name == "onnxruntime" and m.compile.quantize != "none":
        notes.append(f"verify: skipped for compile.quantize={m.compile.quantize} (quantised outputs differ "
                     "from PyTorch by design; measure accuracy on real weights)")
    else:
        stages.append(VerifyStage(task))
    return stages, notes

"""The stage graph for a manifest: load -> transform -> export -> compile -> verify."""

from __future__ import annotations

from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Stage


def stages_for(m: Manifest) -> tuple[list[Stage], list[str]]:
    """The stages to run, in order, and notes on choices made (e.g. the backend)."""
    from qbuild.stages.compile import CompileStage, resolve_backend
    from qbuild.stages.export import ExportStage
    from qbuild.stages.load import LoadStage
    from qbuild.stages.transform import TransformStage
    from qbuild.stages.verify import VerifyStage

    backend, why = resolve_backend(m)
    stages: list[Stage] = [LoadStage(), TransformStage(), ExportStage(), CompileStage(backend)]
    if m.verify.enabled:
        stages.append(VerifyStage())
    return stages, [why]

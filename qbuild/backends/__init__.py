"""Compile backends: turn an exported ONNX model into a runnable artifact.

One contract (``Backend``); a table of names resolved lazily; ``resolve_backend`` picks one for a
manifest and says why. Heavy imports happen only inside ``compile``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qbuild.manifest.schema import Manifest

if TYPE_CHECKING:
    from qbuild.stages.base import StageContext
    from qbuild.tasks import Task

_BACKENDS = {
    "onnxruntime": "qbuild.backends.ort_backend:OrtBackend",
    "qaic": "qbuild.backends.qaic:QaicBackend",
}


class Backend:
    """Given an ONNX artifact and compile params, produce a compiled artifact directory."""

    name: ClassVar[str]
    tools: ClassVar[tuple[str, ...]]

    def params(self, m: Manifest, task: Task) -> dict[str, Any]:
        """Every manifest value this backend's output depends on, by dotted key."""
        raise NotImplementedError

    def fingerprint(self, m: Manifest) -> dict[str, str]:
        """Versions of external tools beyond ``tools`` (e.g. the compiler SDK)."""
        return {}

    def explain(self, m: Manifest, task: Task) -> list[str]:
        """Lines for ``qbuild plan``: the exact command or configuration that would run."""
        return []

    def can_execute(self) -> bool:
        """Whether this machine can run the compiled artifact (verify, generate, embed)."""
        return True

    def compile(self, ctx: StageContext, onnx: Path, task: Task) -> dict[str, Any]:
        """Compile ``onnx`` into ``ctx.out``; return JSON meta."""
        raise NotImplementedError


def get_backend(name: str) -> Backend:
    module, _, cls = _BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def resolve_backend(m: Manifest) -> tuple[Backend, str]:
    """(backend, why) for ``compile.backend``, checking what this machine has."""
    wanted = m.compile.backend
    if wanted == "onnxruntime":
        return get_backend("onnxruntime"), "compile.backend: onnxruntime"
    qaic = get_backend("qaic")
    found, why = qaic.available(m)  # type: ignore[attr-defined]
    if wanted == "auto":
        if found:
            return qaic, f"compile.backend: auto -> qaic ({why})"
        return get_backend("onnxruntime"), f"compile.backend: auto -> onnxruntime ({why})"
    if not found:
        from qbuild.errors import PlanError

        raise PlanError(f"compile.backend: qaic needs the Cloud AI 100 SDK; {why}",
                        hint="install the SDK or set compile.qaic.compiler / QAIC_SDK_DIR; "
                             "to build for CPU use compile=onnxruntime")
    return qaic, f"compile.backend: qaic ({why})"

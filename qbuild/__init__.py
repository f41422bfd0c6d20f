"""qbuild: declarative, incremental builds of transformers for Cloud AI 100 and ONNX Runtime.

The Python API: :func:`build`, :func:`plan`, :func:`run`, :func:`embed` and :func:`load` take a manifest (a
file, or ``model.manifest`` of a QEFF model); the QEFF classes (:mod:`qbuild.qeff`) give QEfficient's API on
the same build graph. Every error is a :class:`QBuildError`. Importing qbuild imports neither torch nor
transformers.
"""

from __future__ import annotations

__version__ = "0.1.0"

from qbuild.api import BuildResult, RunResult, build, embed, load, plan, run
from qbuild.errors import (
    CacheError,
    CompileError,
    ExportError,
    ManifestError,
    PlanError,
    QBuildError,
    RunError,
    StageError,
    TransformError,
    VerifyError,
)
from qbuild.qeff import (
    ApiManifest,
    CompiledModel,
    ExecInfo,
    QEFFAutoModel,
    QEFFAutoModelForCausalLM,
    QEFFTransformersBase,
    transform_lm,
)

__all__ = [
    "ApiManifest",
    "BuildResult",
    "CacheError",
    "CompileError",
    "CompiledModel",
    "ExecInfo",
    "ExportError",
    "ManifestError",
    "PlanError",
    "QBuildError",
    "QEFFAutoModel",
    "QEFFAutoModelForCausalLM",
    "QEFFTransformersBase",
    "RunError",
    "RunResult",
    "StageError",
    "TransformError",
    "VerifyError",
    "__version__",
    "build",
    "embed",
    "load",
    "plan",
    "run",
    "transform_lm",
]

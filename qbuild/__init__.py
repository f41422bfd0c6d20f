"""qbuild: declarative, incremental builds of transformers for Cloud AI 100 and ONNX Runtime."""

from __future__ import annotations

__version__ = "0.1.0"

from qbuild.api import BuildResult, build, plan
from qbuild.errors import (
    CacheError,
    CompileError,
    ExportError,
    ManifestError,
    PlanError,
    QBuildError,
    StageError,
    VerifyError,
)

__all__ = [
    "BuildResult",
    "CacheError",
    "CompileError",
    "ExportError",
    "ManifestError",
    "PlanError",
    "QBuildError",
    "StageError",
    "VerifyError",
    "__version__",
    "build",
    "plan",
]

"""Compile backends: turn an exported ONNX model into a runnable artifact, and open it again.

One contract (:class:`Backend`) covers the whole artifact lifecycle: resolve the manifest (its own
``compile.<backend>`` group, the task, the machine) into frozen options, compile with those options,
say whether this machine can execute an artifact built with them, and open an artifact. A table of
names resolved lazily; :func:`resolve_backend` picks one for a manifest and says why. Heavy imports
happen only inside ``compile`` and ``open``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qbuild.manifest.schema import Manifest

if TYPE_CHECKING:
    from qbuild.runtime import Artifact
    from qbuild.stages.base import StageContext
    from qbuild.store import StatCache
    from qbuild.tasks import Task

_BACKENDS = {
    "onnxruntime": "qbuild.backends.onnxruntime:OrtBackend",
    "qaic": "qbuild.backends.qaic:QaicBackend",
    "qnn": "qbuild.backends.qnn:QnnBackend",
}


class Backend:
    """Given an ONNX artifact and resolved options, produce a compiled artifact directory; open it."""

    name: ClassVar[str]
    #: installed packages whose versions shape the artifact
    tools: ClassVar[tuple[str, ...]]
    #: qbuild source files (globs relative to the package) of this backend's recipe
    code: ClassVar[tuple[str, ...]]

    def available(self, m: Manifest) -> tuple[bool, str]:
        """(usable to compile on this machine, why), for ``compile.backend: auto``."""
        return True, f"{self.name} is always available"

    def resolve(self, m: Manifest, task: Task, stats: StatCache) -> Any:
        """The frozen options ``compile`` runs on: this backend's settings, ``specializations``, machine facts."""
        raise NotImplementedError

    def fingerprint(self, options: Any) -> dict[str, str]:
        """Versions of external tools beyond ``tools`` (e.g. the compiler SDK)."""
        return {}

    def describe(self, options: Any, onnx: Path | None = None) -> list[str]:
        """Lines for ``qbuild plan --explain``: the exact command or configuration that would run
        (``onnx``: the exported graph, when it exists already)."""
        return []

    def can_execute(self, options: Any) -> tuple[bool, str]:
        """(whether this machine can run an artifact built with ``options``, why)."""
        return True, "runs here"

    def inexact(self, options: Any) -> str | None:
        """Why outputs differ from PyTorch by design (so verify is skipped), or None."""
        return None

    def compile(self, options: Any, onnx: Path, export: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
        """Compile ``onnx`` (``export``: the export stage's meta) into ``ctx.out``; return JSON meta."""
        raise NotImplementedError

    def open(self, directory: Path, *, threads: int | None = None) -> Artifact:
        """Open an artifact this backend compiled."""
        raise NotImplementedError


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        from qbuild.errors import RunError

        raise RunError(f"unknown backend {name!r}; known: {', '.join(sorted(_BACKENDS))}")
    module, _, cls = _BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def resolve_backend(m: Manifest) -> tuple[Backend, str]:
    """(backend, why) for ``compile.backend``, checking what this machine has."""
    wanted = m.compile.backend
    if wanted == "onnxruntime":
        return get_backend("onnxruntime"), "compile.backend: onnxruntime"
    if wanted == "qnn":  # chosen by name only: auto never picks it
        qnn = get_backend("qnn")
        return qnn, f"compile.backend: qnn ({qnn.available(m)[1]})"
    qaic = get_backend("qaic")
    found, why = qaic.available(m)
    if wanted == "auto":
        from qbuild.backends.qaic_sdk import discover

        sdk = discover(m) if found else None
        if sdk is not None and not (sdk.apps_version or sdk.platform_version):
            # an executable that no SDK installation vouches for (compile.qaic.compiler=/bin/false): auto does
            # not bet a build on it; compile=qaic uses it as given
            return get_backend("onnxruntime"), (f"compile.backend: auto -> onnxruntime ({sdk.compiler} has no Cloud "
                                                f"AI 100 SDK around it: no versions/apps.xml; compile=qaic uses it "
                                                f"anyway)")
        if found:
            return qaic, f"compile.backend: auto -> qaic ({why})"
        return get_backend("onnxruntime"), f"compile.backend: auto -> onnxruntime ({why})"
    if not found:
        from qbuild.errors import PlanError

        raise PlanError(f"compile.backend: qaic needs the Cloud AI 100 SDK; {why}",
                        hint="install the SDK or set compile.qaic.compiler / QAIC_SDK_DIR; "
                             "to build for CPU use compile=onnxruntime")
    return qaic, f"compile.backend: qaic ({why})"

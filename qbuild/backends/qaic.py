"""The Cloud AI 100 backend (qaic-compile / qaic-exec). Placeholder until issue 5: discovery only."""

from __future__ import annotations

import os
from pathlib import Path

from qbuild.backends import Backend
from qbuild.manifest.schema import Manifest


def sdk_dir(m: Manifest) -> Path:
    return Path(m.compile.qaic.sdk_dir or os.environ.get("QAIC_SDK_DIR") or "/opt/qti-aic")


class QaicBackend(Backend):
    name = "qaic"
    tools = ("qbuild", "onnx")

    def compiler(self, m: Manifest) -> Path | None:
        """The compiler: ``compile.qaic.compiler`` or the SDK's qaic-compile / qaic-exec."""
        if m.compile.qaic.compiler:
            p = Path(m.compile.qaic.compiler)
            return p if p.is_file() and os.access(p, os.X_OK) else None
        for name in ("qaic-compile", "qaic-exec"):
            p = sdk_dir(m) / "exec" / name
            if p.is_file() and os.access(p, os.X_OK):
                return p
        return None

    def available(self, m: Manifest) -> tuple[bool, str]:
        found = self.compiler(m)
        if found is not None:
            return True, f"compiler {found}"
        looked = m.compile.qaic.compiler or f"{sdk_dir(m)}/exec/qaic-compile and qaic-exec"
        return False, f"no Cloud AI 100 compiler found (looked for {looked})"

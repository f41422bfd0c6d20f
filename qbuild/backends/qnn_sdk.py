"""Finding the QNN SDK: its two tools, its libraries and its version (for the compile key).

Facts (../shared/reference/qefficient-modes.md 2.2, 2.3): the root is ``$QNN_SDK_ROOT`` (qbuild:
``compile.qnn.sdk_dir`` first); the target directory is fixed, ``x86_64-linux-clang``; the tools are
``<root>/bin/<target>/qairt-converter`` and ``qnn-context-binary-generator``, the backend library
``<root>/lib/<target>/libQnnAic.so`` and the extensions library ``libQnnAicNetRunExtensions.so``;
``<root>/sdk.yaml`` describes the SDK (QEfficient copies it into ``qconfig.json``). Its ``version`` is
keyed; without one, the digest of sdk.yaml (or, without sdk.yaml, of the tools) stands in, so a changed
SDK still recompiles. Nothing here imports a heavy library or runs a subprocess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.manifest.schema import Manifest
from qbuild.plan.params import unkeyed

ENV_VAR = "QNN_SDK_ROOT"
TARGET = "x86_64-linux-clang"
CONVERTER = "qairt-converter"
GENERATOR = "qnn-context-binary-generator"
BACKEND_LIB = "libQnnAic.so"
EXTENSIONS_LIB = "libQnnAicNetRunExtensions.so"
SDK_YAML = "sdk.yaml"
_FINGERPRINTED = "in the compile key as a tool version (fingerprint())"


@dataclass(frozen=True)
class QnnSdk:
    """What was found: the SDK root (its tools and libraries lie at fixed places under it) and its version."""

    root: str = unkeyed(why="where the SDK lies; its version (or digest) is keyed")
    version: str | None = unkeyed(None, why=_FINGERPRINTED)

    def tool(self, name: str) -> str:
        return f"{self.root}/bin/{TARGET}/{name}"

    def lib(self, name: str) -> str:
        return f"{self.root}/lib/{TARGET}/{name}"

    @property
    def converter(self) -> str:
        return self.tool(CONVERTER)

    @property
    def generator(self) -> str:
        return self.tool(GENERATOR)


def sdk_root(m: Manifest) -> tuple[Path | None, str]:
    """(the SDK root, where it came from): ``compile.qnn.sdk_dir``, else ``$QNN_SDK_ROOT``, else None."""
    if m.compile.qnn.sdk_dir:
        return Path(m.compile.qnn.sdk_dir).absolute(), "compile.qnn.sdk_dir"
    env = os.environ.get(ENV_VAR)
    return (Path(env).absolute(), f"${ENV_VAR}") if env else (None, "")


def _executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def missing_tools(root: Path) -> list[str]:
    """The tools of the chain that are not executable files under ``root``."""
    tools = [root / "bin" / TARGET / t for t in (CONVERTER, GENERATOR)]
    return [str(t) for t in tools if not _executable(t)]


def looked_for(m: Manifest) -> str:
    """Where discovery looked, for messages."""
    root, origin = sdk_root(m)
    if root is None:
        return f"${ENV_VAR} is not set (nor compile.qnn.sdk_dir)"
    return f"looked for {' and '.join(missing_tools(root)) or 'the tools'} ({origin}={root})"


def read_sdk_yaml(root: Path) -> dict[str, Any]:
    """The mapping in ``<root>/sdk.yaml`` ({} when absent or not a mapping)."""
    path = root / SDK_YAML
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def sdk_version(info: dict[str, Any]) -> str | None:
    """The SDK version from sdk.yaml: its ``version`` entry, else the first entry whose key ends in ``version``."""
    for key, value in [("version", info.get("version")), *info.items()]:
        if str(key).lower().endswith("version") and isinstance(value, (str, int, float)) and str(value).strip():
            return str(value).strip()
    return None


def discover(m: Manifest) -> QnnSdk | None:
    """The SDK this manifest would compile with, or None (read every time: a few stats and sdk.yaml)."""
    root, _origin = sdk_root(m)
    if root is None or missing_tools(root):
        return None
    return QnnSdk(str(root), sdk_version(read_sdk_yaml(root)))


def fingerprint(sdk: QnnSdk) -> dict[str, str]:
    """Tool versions for the compile key: the SDK version, else a digest of sdk.yaml or of the tools."""
    from qbuild.backends.qaic_sdk import file_sha256

    if sdk.version:
        return {"qnn-sdk": sdk.version}
    files = [Path(sdk.root) / SDK_YAML]
    if not files[0].is_file():
        files = [Path(sdk.converter), Path(sdk.generator)]
    digests = []
    for f in files:
        st = f.stat()
        digests.append(file_sha256(str(f), st.st_size, st.st_mtime_ns))
    return {"qnn-sdk": "unversioned", "qnn-sdk-sha256": ",".join(digests)}


def describe(sdk: QnnSdk) -> str:
    """One line for plans and notes."""
    return f"QNN SDK at {sdk.root}" + (f" (version {sdk.version})" if sdk.version else f" (no version in {SDK_YAML})")

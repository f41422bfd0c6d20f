"""Canonical JSON, sha256 keys and tool fingerprints (no heavy imports)."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the one serialisation keys are hashed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(obj: Any) -> str:
    """sha256 hex of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


@cache
def tool_version(name: str) -> str:
    """Installed version of a tool, read from package metadata (never imports the tool)."""
    if name == "qbuild":
        from qbuild import __version__

        return __version__
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def fingerprints(names: tuple[str, ...]) -> dict[str, str]:
    """Versions of the named tools."""
    return {n: tool_version(n) for n in names}

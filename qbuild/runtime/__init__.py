"""Runtime: sessions and loops on any backend's compiled artifact (generate: prefill buckets + decode
with a retained KV cache; embed: sentence embeddings in length buckets).

An artifact records the backend that compiled it (``artifact.json``); :func:`open_artifact` asks that
backend to open it, so no caller guesses from the files what an artifact is. Submodules import numpy,
tokenizers, onnxruntime and qaicrt inside their functions only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from qbuild.errors import RunError, one_line

ARTIFACT_FILE = "artifact.json"


class Sessions(Protocol):
    """The sessions of an artifact: its specialisations and a session for concrete symbol values."""

    specializations: list[dict[str, Any]]
    mode: str
    #: True when ``session_for`` also runs shapes no specialisation names (one dynamic session)
    any_shape: bool

    def session_for(self, symbols: dict[str, int]) -> Any: ...


class Artifact(Protocol):
    """A compiled artifact opened by its backend."""

    backend: str
    directory: Path

    def sessions(self) -> Sessions:
        """Sessions that run the graph's inputs per specialisation (embeddings, plain causal LMs)."""
        ...

    def kv_runtime(self, *, ctx_len: int, buckets: Sequence[int]) -> Any:
        """The prefill/decode loop of a retained-state KV causal LM (``runtime.generate.KVRuntime``)."""
        ...


def artifact_record(directory: Path) -> dict[str, Any]:
    """``artifact.json`` of a compiled artifact: its backend, task and resolved options."""
    path = Path(directory) / ARTIFACT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"{directory} is not a compiled artifact: cannot read {ARTIFACT_FILE}: {one_line(exc)}",
                       hint="build it with qbuild; the compile stage's artifact directory holds it") from exc


def open_artifact(directory: Path, *, threads: int | None = None) -> Artifact:
    """Open a compiled artifact with the backend recorded in it."""
    from qbuild.backends import get_backend

    record = artifact_record(directory)
    return get_backend(record["backend"]).open(Path(directory), threads=threads)

"""Tasks: what a model is exported as, how it is specialised and verified (causal LM, embedding).

The stages are task-neutral and delegate here; a task is picked from the manifest without heavy
imports. Registry of names resolved lazily: ``"module:Class"``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qbuild.manifest.schema import Manifest

if TYPE_CHECKING:
    from qbuild.stages.base import StageContext

_TASKS = {
    "causal_lm": "qbuild.tasks.causal_lm:CausalLMTask",
    "causal_lm_kv": "qbuild.tasks.kv_causal_lm:KVCausalLMTask",
    "embedding": "qbuild.tasks.embedding:EmbeddingTask",
}


class Task:
    """The task-specific parts of export, compile and verify."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    default_atol: ClassVar[float] = 1e-4

    def export_params(self, m: Manifest) -> dict[str, Any]:
        """Manifest values that shape the exported graph, by dotted key."""
        return {}

    def export(self, model: Any, out: Path, m: Manifest) -> dict[str, Any]:
        """Write ``model.onnx`` into ``out``; return meta with ``onnx`` (relative path)."""
        raise NotImplementedError

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        """Concrete values of the graph's symbolic dims: ``[{"name": ..., "symbols": {dim: int}}]``."""
        return []

    def sample_inputs(self, m: Manifest, symbols: dict[str, int]) -> dict[str, Any] | None:
        """Representative graph inputs (numpy arrays by input name) for one specialisation's symbol values;
        a backend measures sessions with them. None: the task has none (nothing is measured)."""
        return None

    def verify_params(self, m: Manifest) -> dict[str, Any]:
        v = m.verify
        return {"verify.atol": self.atol(m), "verify.seed": v.seed}

    def atol(self, m: Manifest) -> float:
        return m.verify.atol if m.verify.atol is not None else self.default_atol

    def verify(self, ctx: StageContext, compiled: Path) -> dict[str, Any]:
        """Compare the compiled artifact with PyTorch; raise VerifyError on mismatch; return a report."""
        raise NotImplementedError


def task_name(m: Manifest) -> str:
    if m.model.task == "embedding":
        return "embedding"
    return "causal_lm_kv" if "kv_cache" in m.transforms.apply else "causal_lm"


def task_for(m: Manifest) -> Task:
    """The task object for a manifest."""
    module, _, cls = _TASKS[task_name(m)].partition(":")
    return getattr(importlib.import_module(module), cls)()

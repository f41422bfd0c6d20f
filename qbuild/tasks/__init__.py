"""Tasks: what a model is exported as, how it is specialised and verified (causal LM, KV causal LM,
embedding). One module per task holds its export, example inputs, specialisations and verify, read top
to bottom; the stages are task-neutral and delegate here. A task is picked from the manifest without
heavy imports (registry of names resolved lazily: ``"module:Class"``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qbuild.manifest.schema import Manifest

if TYPE_CHECKING:
    from qbuild.runtime import Artifact
    from qbuild.stages.base import StageContext
    from qbuild.stages.export import ExportParams
    from qbuild.stages.verify import VerifyParams

_TASKS = {
    "causal_lm": "qbuild.tasks.causal_lm:CausalLMTask",
    "causal_lm_kv": "qbuild.tasks.kv_causal_lm:KVCausalLMTask",
    "embedding": "qbuild.tasks.embedding:EmbeddingTask",
    "image_text_to_text": "qbuild.tasks.vlm:VLMTask",
    "image_text_to_text_single": "qbuild.tasks.vlm_single:VLMSingleTask",
    "vlm_vision": "qbuild.tasks.vlm:VisionTask",
}


class Task:
    """The task-specific parts of export, compile and verify."""

    name: ClassVar[str]
    #: qbuild source files (globs relative to the package) of this task's recipe
    code: ClassVar[tuple[str, ...]]
    #: whether the graph carries a retained-state KV cache (qaic: -retained-state and custom_io.yaml)
    retained_state: ClassVar[bool] = False
    default_atol: ClassVar[float] = 1e-4

    def export_options(self, m: Manifest) -> Any:
        """The task's own export options (a frozen dataclass), or None."""
        return None

    def export(self, model: Any, out: Path, p: ExportParams, ctx: StageContext) -> dict[str, Any]:
        """Write ``model.onnx`` into ``out``; return meta with ``onnx`` (relative path)."""
        raise NotImplementedError

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        """Concrete values of the graph's symbolic dims: ``[{"name": ..., "symbols": {dim: int}}]``."""
        return []

    def sample_inputs(self, symbols: dict[str, int], vocab_size: int) -> dict[str, Any] | None:
        """Representative graph inputs (numpy arrays by input name) for one specialisation's symbol values;
        a backend measures sessions with them. None: the task has none (nothing is measured)."""
        return None

    def calibration_inputs(self, specializations: list[dict[str, Any]], vocab_size: int, *,
                           graph_inputs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Inputs a weight quantisation is measured on (numpy arrays by input name); by default the sample
        inputs of each specialisation. ``graph_inputs``: the exported graph's inputs (``name``, ``type``,
        ``shape`` with symbolic dims as names), for tasks whose inputs depend on the model (caches)."""
        feeds = [self.sample_inputs(dict(s["symbols"]), vocab_size) for s in specializations]
        return [f for f in feeds if f is not None]

    def verify_options(self, m: Manifest) -> Any:
        """The task's verify options (a frozen dataclass)."""
        raise NotImplementedError

    def atol(self, m: Manifest) -> float:
        return m.verify.atol if m.verify.atol is not None else self.default_atol

    def verify(self, p: VerifyParams, ctx: StageContext, artifact: Artifact) -> dict[str, Any]:
        """Compare the compiled artifact with PyTorch; raise VerifyError on mismatch; return a report."""
        raise NotImplementedError


def task_name(m: Manifest) -> str:
    """``model.task``, with ``causal_lm`` + the ``kv_cache`` rewrite meaning the retained-state KV task."""
    if m.model.task == "embedding":
        return "embedding"
    if m.model.task == "image-text-to-text":  # vlm.mode single: one program (qbuild.tasks.vlm_single)
        return "image_text_to_text_single" if m.vlm.mode == "single" else "image_text_to_text"
    return "causal_lm_kv" if "kv_cache" in m.transforms.apply else "causal_lm"


def get_task(name: str) -> Task:
    module, _, cls = _TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def task_for(m: Manifest) -> Task:
    """The task object for a manifest (``model.adapters`` on the KV task: the multi-LoRA variant, same name)."""
    name = task_name(m)
    if name == "causal_lm_kv" and m.model.adapters:
        from qbuild.tasks.kv_lora import KVLoraTask

        return KVLoraTask()
    return get_task(name)

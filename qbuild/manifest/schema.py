"""The manifest schema: one frozen dataclass per config group.

Field metadata drives validation (``qbuild.manifest.validate``):
``choices`` (allowed values), ``min`` / ``max`` (inclusive range), ``help`` (shown in errors).
Cross-field rules live in ``check_manifest``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _f(default: Any = None, *, factory: Any = None, **meta: Any) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from: exactly one of ``path``, ``name`` or ``init: random``."""

    task: str = _f("causal_lm", choices=["causal_lm", "embedding"])
    path: str | None = _f(None, help="local directory in save_pretrained format")
    name: str | None = _f(None, help="hub id, resolved from the local Hugging Face cache")
    revision: str = _f("main")
    init: str | None = _f(None, choices=[None, "random"], help="random: initialise from `architecture`")
    architecture: str | None = _f(None, help="transformers model_type for init: random, e.g. llama")
    config: dict[str, Any] = _f(factory=dict, help="config overrides (init: random) ")
    seed: int = _f(0, min=0)
    dtype: str = _f("float32", choices=["float32", "float16", "bfloat16"])


@dataclass(frozen=True)
class TransformsSpec:
    """Module rewrites applied before export, by registered name, in order."""

    apply: list[str] = _f(factory=list)


@dataclass(frozen=True)
class PoolingSpec:
    """Pooling of encoder outputs (embedding models)."""

    method: str = _f("none", help="mean, max, cls, avg, none, or module:function")
    normalize: bool = _f(False)


@dataclass(frozen=True)
class SeqSpec:
    """Sequence-length buckets, context length and batch size."""

    lengths: list[int] = _f(factory=lambda: [32], min=1)
    ctx_len: int = _f(128, min=1)
    batch_size: int = _f(1, min=1)


@dataclass(frozen=True)
class ExportSpec:
    """How the PyTorch module becomes ONNX."""

    exporter: str = _f("legacy", choices=["legacy", "dynamo"])
    opset: int = _f(17, min=14, max=23)


@dataclass(frozen=True)
class CompileSpec:
    """Backend and compiler flags."""

    backend: str = _f("onnxruntime", choices=["onnxruntime", "qaic", "auto"])
    num_cores: int = _f(2, min=1, max=64)
    graph_optimization: str = _f("extended", choices=["basic", "extended", "all"])
    mxfp6_matmul: bool = _f(False)
    mxint8_kv_cache: bool = _f(False)
    num_devices: int = _f(1, min=1)


@dataclass(frozen=True)
class VerifySpec:
    """Compiled artifact vs PyTorch on fixed inputs."""

    enabled: bool = _f(True)
    atol: float = _f(1e-4, min=0.0)
    batch_size: int = _f(2, min=1)
    seq_len: int = _f(16, min=1)
    seed: int = _f(0, min=0)


@dataclass(frozen=True)
class Manifest:
    """A fully composed, validated build description."""

    model: ModelSpec = _f(factory=ModelSpec)
    transforms: TransformsSpec = _f(factory=TransformsSpec)
    pooling: PoolingSpec = _f(factory=PoolingSpec)
    seq: SeqSpec = _f(factory=SeqSpec)
    export: ExportSpec = _f(factory=ExportSpec)
    compile: CompileSpec = _f(factory=CompileSpec)
    verify: VerifySpec = _f(factory=VerifySpec)
    name: str = _f("", help="artifact name; defaults to the manifest file's stem")

"""QEfficient's Python API on qbuild's build graph, for people porting notebooks and scripts::

    from qbuild.qeff import QEFFAutoModel
    model = QEFFAutoModel.from_pretrained(model_dir)   # a directory, a cached hub id or a loaded model
    model.compile(num_cores=16)                        # builds model.manifest through the cache
    model.generate(tokenizer("My name is", return_tensors="pt"))
    model.manifest.save("x.yaml")                      # qbuild x.yaml: the same keys, all cached

Every call composes the model's manifest and builds it with :func:`qbuild.build` (same cache, same keys as
the CLI). Unknown keyword arguments, and QEfficient ones that qbuild does not support yet, are refused by
name.
"""

from __future__ import annotations

from qbuild.qeff.manifest import ApiManifest
from qbuild.qeff.models import QEFFAutoModel, QEFFAutoModelForCausalLM, QEFFTransformersBase, transform_lm
from qbuild.qeff.runnable import CompiledModel, ExecInfo

__all__ = [
    "ApiManifest",
    "CompiledModel",
    "ExecInfo",
    "QEFFAutoModel",
    "QEFFAutoModelForCausalLM",
    "QEFFTransformersBase",
    "transform_lm",
]

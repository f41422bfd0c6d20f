"""The stage contract and the context a stage runs in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from qbuild.manifest.schema import Manifest
from qbuild.store import Entry, Store


@dataclass(frozen=True)
class Source:
    """Where the model comes from, resolved at plan time (no heavy imports)."""

    kind: str  # "random" | "path" | "hub"
    directory: Path | None = None
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    tokenizer: Path | None = None  # a tokenizer directory named by model.tokenizer


@dataclass
class StageContext:
    """What ``run()`` gets: its staging ``out`` dir, upstream entries and a per-build memo."""

    manifest: Manifest
    source: Source
    out: Path
    inputs: dict[str, Entry]
    memo: dict[str, Any]
    store: Store
    progress: Callable[[str, float | None], None] = lambda _msg, _frac: None

    def model(self) -> Any:
        """The loaded and transformed PyTorch model, built once per process."""
        if "model" not in self.memo:
            from qbuild.models.source import load_model
            from qbuild.transforms import apply_transforms

            m = self.manifest.model
            model = load_model(self.model_dir(), m.task, m.dtype)
            self.memo["transform_report"] = apply_transforms(model, self.manifest.transforms.apply)
            self.memo["model"] = model
        return self.memo["model"]

    def model_dir(self) -> Path:
        if self.source.kind == "random":
            return self.inputs["load"].out / "model"
        assert self.source.directory is not None
        return self.source.directory

    def tokenizer_dir(self) -> Path:
        """model.tokenizer's directory; trained tokenizers live with the weights of the load entry."""
        if self.source.tokenizer is not None:
            return self.source.tokenizer
        if self.manifest.model.tokenizer == "train-bpe":
            return self.inputs["load"].out / "model"
        return self.model_dir()


class Stage:
    """A build step. Subclasses set the class attributes and implement ``params`` and ``run``."""

    name: ClassVar[str]
    version: ClassVar[int]
    tools: ClassVar[tuple[str, ...]]
    upstream: ClassVar[tuple[str, ...]]

    def params(self, m: Manifest) -> dict[str, Any]:
        """Everything from the manifest that determines the output, by dotted manifest key."""
        raise NotImplementedError

    def sources(self, source: Source) -> dict[str, str]:
        """Digests of external inputs (weights); empty for most stages."""
        return {}

    def fingerprint(self, m: Manifest) -> dict[str, str]:
        """Versions of the tools that shape the output."""
        from qbuild.plan.keys import fingerprints

        return fingerprints(self.tools)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Write outputs into ``ctx.out``; return JSON meta, with ``artifacts`` as relative paths."""
        raise NotImplementedError

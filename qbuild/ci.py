"""Several manifests in one run, cache modes and bundles: what a CI job that builds artifacts needs.

``qbuild manifests/a.yaml manifests/b.toml ...`` (or a directory, or a glob) composes and plans every
manifest first (a bad one fails the run before anything is built), then builds them one after another
against one cache, so stages they share are built once. ``--cache``:

- ``on`` (default): build what is missing;
- ``readonly``: write nothing; the first stage that is not cached fails the run (``CacheMiss``, naming the
  manifest, the stage and why it would be built): proof that the committed manifests were built;
- ``redo``: rebuild every stage, compare each output with the cached one and fail (``NotReproducible``)
  naming every stage whose bytes differ; the cached entries are kept;
- ``verify``: re-digest every cached file a build uses from its bytes (not from the stat cache);
- ``off``: a throwaway cache, removed at the end.

``--out DIR`` writes each manifest's bundle (:mod:`qbuild.bundle`) to ``DIR/<manifest name>/``.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.errors import CacheMiss, ManifestError, NotReproducible

CACHE_MODES = ("on", "off", "readonly", "redo", "verify")
SUFFIXES = (".yaml", ".yml", ".toml")


def is_manifest_arg(text: str) -> bool:
    """Whether a positional argument names manifests (a path, directory or glob) rather than an override."""
    return "=" not in text and not text.startswith(("~", "+"))


def expand_manifests(args: Sequence[str]) -> list[Path]:
    """Files as given; a directory: its ``*.yaml|*.yml|*.toml`` (not recursive); a glob: its matches."""
    out: list[Path] = []
    for text in args:
        path = Path(text)
        if any(c in text for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(text) if m.endswith(SUFFIXES))
            if not matches:
                raise ManifestError(f"{text}: no manifest matches this pattern")
            out += matches
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise ManifestError(f"{text}: no .yaml, .yml or .toml manifest in this directory")
            out += found
        else:
            out.append(path)
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.absolute() not in seen:
            seen.add(p.absolute())
            unique.append(p)
    return unique


@dataclass
class ManifestBuild:
    """One manifest's part of a run."""

    name: str
    source: str
    result: Any  # BuildResult
    bundle: Path | None = None

    def summary(self) -> dict[str, Any]:
        out = {**self.result.summary(), "manifest": self.source}
        if self.bundle is not None:
            out["bundle"] = str(self.bundle)
        return out


def build_many(manifests: Sequence[str | os.PathLike[str]], overrides: Sequence[str] = (), *,
               cache_dir: str | os.PathLike[str] | None = None, cache: str = "on", out: str | None = None,
               reporter: Any = None, remote: str | None = None) -> list[ManifestBuild]:
    """Compose and plan every manifest, then build each (per ``cache`` mode); bundles to ``out``."""
    from qbuild.api import _cache, _composed, _remote
    from qbuild.execute.executor import execute
    from qbuild.execute.reporter import Reporter
    from qbuild.plan.planner import make_plan
    from qbuild.store import Store

    if cache not in CACHE_MODES:
        raise ManifestError(f"--cache: unknown mode {cache!r}; one of {', '.join(CACHE_MODES)}")
    reporter = reporter or Reporter()
    throwaway = Path(tempfile.mkdtemp(prefix="qbuild-cache-off-")) if cache == "off" else None
    root = throwaway or _cache(cache_dir)
    try:
        composed = [_composed(m, overrides, root, write=cache != "readonly") for m in manifests]
        names = [c.name for c in composed]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if out is not None and dupes:
            raise ManifestError(f"--out: several manifests are named {', '.join(dupes)}; bundles go to "
                                "DIR/<manifest name>/, so give each a distinct `name:`")
        store = Store(root, readonly=cache == "readonly", **({"verify": True} if cache == "verify" else {}),
                      remote=None if cache in ("off", "readonly") else _remote(remote, composed[0]))
        builds = []
        try:
            plans = [make_plan(c, store) for c in composed]  # every manifest planned before any build
            if cache == "readonly":
                _require_cached(plans)
            for c, p in zip(composed, plans, strict=True):
                if cache not in ("off", "readonly") and len(composed) > 1:
                    store.remote = _remote(remote, c)
                if len(composed) > 1:
                    reporter.emit({"event": "manifest", "name": c.name, "manifest": str(c.source)})
                p = make_plan(c, store) if builds else p  # an earlier manifest may have built shared stages
                reporter.emit({"event": "plan", "notes": p.notes,
                               "stages": [{"name": s.name, "key": s.key, "state": s.state, "reasons": s.reasons}
                                          for s in p.stages]})
                result = execute(p, store, reporter, redo=cache == "redo")
                bundle = None
                if out is not None:
                    from qbuild.bundle import write_bundle

                    bundle = write_bundle(Path(out), p, result, store)
                builds.append(ManifestBuild(c.name, str(c.source), result, bundle))
        finally:
            store.close()
        if cache == "redo":
            _require_reproducible(builds)
        return builds
    finally:
        reporter.close()
        if throwaway is not None:
            from qbuild.store.store import remove_tree

            remove_tree(throwaway)


def _require_cached(plans: list[Any]) -> None:
    for p in plans:
        for s in p.stages:
            if s.state != "cached":
                raise CacheMiss(f"--cache=readonly: {p.composed.name}: stage {s.name} is not in the cache "
                                f"({'; '.join(s.reasons) or 'never built'})",
                                hint="build it (qbuild MANIFEST) and save the cache, or drop --cache=readonly")


def _require_reproducible(builds: list[ManifestBuild]) -> None:
    bad = [f"{b.name}: {s['name']} ({', '.join(s['differs'][:5])})" for b in builds for s in b.result.stages
           if s.get("reproducible") is False]
    if bad:
        raise NotReproducible("--cache=redo: rebuilt outputs differ from the cached ones: " + "; ".join(bad))

"""The Python API the CLI calls: compose a manifest, plan it, build it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from qbuild.execute.executor import BuildResult, execute
from qbuild.execute.reporter import Reporter
from qbuild.manifest import ComposedManifest, compose
from qbuild.plan.planner import Plan, make_plan
from qbuild.store import Store, default_cache_dir

__all__ = ["BuildResult", "build", "plan"]

PathLike = str | os.PathLike


def _cache(cache_dir: PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _composed(manifest: PathLike | ComposedManifest, overrides: Sequence[str], cache: Path, *,
              write: bool) -> ComposedManifest:
    if isinstance(manifest, ComposedManifest):
        return manifest
    return compose(manifest, list(overrides), memo_dir=cache / "compose", memo_write=write)


def plan(manifest: PathLike | ComposedManifest, overrides: Sequence[str] = (), *,
         cache_dir: PathLike | None = None) -> Plan:
    """Plan a build: per stage its key, state and reasons. Writes nothing."""
    store = Store(_cache(cache_dir), readonly=True)
    try:
        return make_plan(_composed(manifest, overrides, store.root, write=False), store)
    finally:
        store.close()


def build(manifest: PathLike | ComposedManifest, overrides: Sequence[str] = (), *,
          cache_dir: PathLike | None = None, reporter: Reporter | None = None) -> BuildResult:
    """Build what is missing from the cache and return the stages and artifacts."""
    cache = _cache(cache_dir)
    composed = _composed(manifest, overrides, cache, write=True)  # bad input fails before any write
    store = Store(cache)
    reporter = reporter or Reporter()
    try:
        the_plan = make_plan(composed, store)
        reporter.emit({"event": "plan", "notes": the_plan.notes,
                       "stages": [{"name": s.name, "key": s.key, "state": s.state, "reasons": s.reasons}
                                  for s in the_plan.stages]})
        return execute(the_plan, store, reporter)
    finally:
        store.close()
        reporter.close()

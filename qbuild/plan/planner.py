"""The pure planner: per stage its key, state (cached / build) and the reasons. Writes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qbuild.manifest import ComposedManifest
from qbuild.plan.graph import stages_for
from qbuild.plan.keys import digest
from qbuild.stages.base import Source, Stage
from qbuild.stages.load import resolve_source
from qbuild.store import Entry, Store


@dataclass(frozen=True)
class StagePlan:
    stage: Stage
    key: str
    identity: dict[str, Any]
    state: str  # "cached" | "build"
    reasons: list[str]
    entry: Entry | None

    @property
    def name(self) -> str:
        return self.stage.name


@dataclass(frozen=True)
class Plan:
    composed: ComposedManifest
    source: Source
    stages: list[StagePlan]
    notes: list[str]
    manifest_id: str

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


def manifest_id(composed: ComposedManifest) -> str:
    """Identity of a manifest file for its build history (not part of any key)."""
    return digest(str(composed.source))[:16]


def identity(stage: Stage, composed: ComposedManifest, source: Source, upstream: dict[str, str]) -> dict:
    """Everything that determines the stage's output: hashed into its key."""
    return {
        "stage": stage.name,
        "version": stage.version,
        "params": stage.params(composed.manifest),
        "sources": stage.sources(source),
        "upstream": upstream,
        "tools": stage.fingerprint(composed.manifest),
    }


def make_plan(composed: ComposedManifest, store: Store) -> Plan:
    """Plan the build of ``composed`` against ``store`` (pure: reads the cache, writes nothing)."""
    stages, notes = stages_for(composed.manifest)
    source = resolve_source(composed.manifest, store.stats)
    mid = manifest_id(composed)
    history = store.read_history(mid).get("stages", {})
    planned: dict[str, StagePlan] = {}
    for stage in stages:
        ident = identity(stage, composed, source, {u: planned[u].key for u in stage.upstream})
        key = digest(ident)
        entry, problem = store.lookup(stage.name, key)
        if entry is not None:
            state, reasons = "cached", []
        elif problem is not None:
            state, reasons = "build", [f"cached output corrupt: {problem}"]
        else:
            prev = history.get(stage.name)
            state, reasons = "build", explain(prev.get("identity") if prev else None, ident)
            if prev and prev.get("key") == key:
                reasons = ["no record (cache entry removed)"]
        planned[stage.name] = StagePlan(stage, key, ident, state, reasons, entry)
    return Plan(composed, source, list(planned.values()), notes, mid)


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def explain(prev: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """Why a stage's key differs from its last build, with values."""
    if not prev:
        return ["no record"]
    reasons: list[str] = []
    if prev.get("version") != now["version"]:
        reasons.append(f"stage version {prev.get('version')} -> {now['version']}")
    reasons += _changed(prev.get("params", {}), now["params"], lambda k, a, b: f"{k}: {_fmt(a)} -> {_fmt(b)}")
    reasons += _changed(prev.get("tools", {}), now["tools"], lambda k, a, b: f"{k} {a} -> {b}")
    reasons += _diff(prev.get("sources", {}), now["sources"],
                     lambda k, a, b: f"weights: {k} {'added' if a is None else 'removed' if b is None else 'changed'}")
    reasons += _diff(prev.get("upstream", {}), now["upstream"], lambda k, a, b: f"upstream {k} rebuilt")
    return reasons or ["no record"]


def _diff(a: dict[str, Any], b: dict[str, Any], fmt: Any) -> list[str]:
    return [fmt(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _changed(a: dict[str, Any], b: dict[str, Any], fmt: Any) -> list[str]:
    """Values changed under the same key; keys only one side has (another backend's flags) are summarised."""
    out = [fmt(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    if (added or removed) and not out:
        out.append("; ".join(f"{what}: {', '.join(keys)}" for what, keys in (("added", added), ("removed", removed))
                             if keys))
    return out

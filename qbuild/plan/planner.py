"""The pure planner: per stage its key, state (cached / build) and the reasons. Writes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qbuild.manifest import ComposedManifest, Manifest
from qbuild.plan.graph import stages_for
from qbuild.plan.keys import digest
from qbuild.plan.params import code_digest, keyed, recording
from qbuild.stages.base import Resolved, Stage
from qbuild.store import Entry, Store


@dataclass(frozen=True)
class StagePlan:
    stage: Stage
    key: str
    resolved: Resolved  # the params run() gets
    identity: dict[str, Any]
    reads: dict[str, Any]  # the manifest values its params came from, by dotted key (not keyed)
    state: str  # "cached" | "build"
    reasons: list[str]
    entry: Entry | None

    @property
    def name(self) -> str:
        return self.stage.name


@dataclass(frozen=True)
class Plan:
    composed: ComposedManifest
    stages: list[StagePlan]
    notes: list[str]
    manifest_id: str

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


def manifest_id(composed: ComposedManifest) -> str:
    """Identity of a manifest file for its build history (not part of any key)."""
    return digest(str(composed.source))[:16]


def identity(stage: Stage, resolved: Resolved, upstream: dict[str, str], code: dict[str, str]) -> dict:
    """Everything that determines the stage's output: hashed into its key."""
    return {
        "stage": stage.name,
        "params": keyed(resolved.params),
        "sources": resolved.sources,
        "upstream": upstream,
        "tools": resolved.tools,
        "code": code,
    }


@dataclass(frozen=True)
class Resolution:
    stage: Stage
    resolved: Resolved
    key: str
    identity: dict[str, Any]
    reads: dict[str, Any]


def resolve_stages(m: Manifest, store: Store) -> tuple[list[Resolution], list[str]]:
    """Each stage of the manifest's graph with its resolved params, key, identity and the manifest values
    it read (pure: reads files' digests through the stat cache and asks the machine, writes nothing)."""
    stages, notes = stages_for(m)
    keys: dict[str, str] = {}
    out = []
    for stage in stages:
        if stage.name == "verify":
            skip = _verify_skipped(out[-1])
            if skip:
                notes.append(f"verify: skipped, {skip}")
                continue
        view, reads = recording(m)
        resolved = stage.resolve(view, store.stats)
        ident = identity(stage, resolved, {u: keys[u] for u in stage.upstream}, code_digest(stage.code, store.stats))
        keys[stage.name] = digest(ident)
        out.append(Resolution(stage, resolved, keys[stage.name], ident, {**stage.selected_by, **reads}))
    return out, notes


def _verify_skipped(compiled: Resolution) -> str | None:
    """Why the compiled artifact cannot be verified here, as its backend says (None: it can)."""
    from qbuild.stages.compile import CompileStage

    stage, resolved = compiled.stage, compiled.resolved
    assert isinstance(stage, CompileStage)
    ok, why = stage.backend.can_execute(resolved.params)
    if not ok:
        return f"the {stage.backend.name} artifact cannot run on this machine ({why})"
    return stage.backend.inexact(resolved.params)


def make_plan(composed: ComposedManifest, store: Store) -> Plan:
    """Plan the build of ``composed`` against ``store`` (pure: reads the cache, writes nothing)."""
    resolved, notes = resolve_stages(composed.manifest, store)
    mid = manifest_id(composed)
    history = store.read_history(mid).get("stages", {})
    planned: list[StagePlan] = []
    for r in resolved:
        stage, key, ident = r.stage, r.key, r.identity
        entry, problem = store.lookup(stage.name, key)
        if entry is not None:
            state, reasons = "cached", []
        elif problem is not None:
            state, reasons = "build", [f"cached output corrupt: {problem}"]
        else:
            prev = history.get(stage.name)
            state, reasons = "build", explain(prev, ident, r.reads)
            if prev and prev.get("key") == key:
                reasons = ["no record (cache entry removed)"]
        if state == "build" and store.remote is not None and store.remote.has(stage.name, key):
            reasons = [f"in the remote cache {store.remote.url}: will be pulled (digests checked)", *reasons]
        planned.append(StagePlan(stage, key, r.resolved, ident, r.reads, state, reasons, entry))
    the_plan = Plan(composed, planned, notes, mid)
    if any(s.name == "export" and s.state == "build" for s in planned):
        from qbuild.plan.memory import export_estimate

        estimate = export_estimate(the_plan, store.root)
        notes.append(estimate.describe() if estimate is not None
                     else "export: peak memory estimated once the load stage has made the weights")
    return the_plan


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def explain(prev: dict[str, Any] | None, now: dict[str, Any], reads: dict[str, Any]) -> list[str]:
    """Why a stage's key differs from its last build (``prev``: its history record), with values: the
    manifest keys its params came from where they changed, else the params fields themselves."""
    before = (prev or {}).get("identity")
    if not before:
        return ["no record"]
    reasons: list[str] = []
    params_before, params_now = flatten(before.get("params", {})), flatten(now["params"])
    if params_before != params_now:
        reasons += _changed(prev.get("reads", {}), reads, lambda k, a, b: f"{k}: {_fmt(a)} -> {_fmt(b)}")
        if not reasons:
            reasons += _changed(params_before, params_now, lambda k, a, b: f"{k}: {_fmt(a)} -> {_fmt(b)}")
    reasons += _changed(before.get("tools", {}), now["tools"], lambda k, a, b: f"{k} {a} -> {b}")
    reasons += _diff(before.get("sources", {}), now["sources"], lambda k, a, b: f"weights: {k} {_what(a, b)}")
    reasons += _diff(before.get("code", {}), now["code"], lambda k, a, b: f"recipe code: qbuild/{k} {_what(a, b)}")
    reasons += _diff(before.get("upstream", {}), now["upstream"], lambda k, a, b: f"upstream {k} rebuilt")
    return reasons or ["no record"]


def _what(a: Any, b: Any) -> str:
    return "added" if a is None else "removed" if b is None else "changed"


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params as ``{"dotted.field": value}`` (lists and other leaves kept whole)."""
    if not isinstance(params, dict) or not params:
        return {prefix: params} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in params.items():
        out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


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

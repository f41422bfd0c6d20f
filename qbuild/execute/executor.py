"""Run a plan: build the stages marked 'build' under per-key locks, publish atomically, report."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbuild import errors
from qbuild.execute.reporter import Reporter
from qbuild.plan.planner import Plan, StagePlan
from qbuild.stages.base import StageContext
from qbuild.store import Entry, Store
from qbuild.store.store import cache_write_error, remove_tree

_STAGE_ERRORS: dict[str, type[errors.StageError]] = {
    "load": errors.LoadError, "export": errors.ExportError,
    "compile": errors.CompileError, "verify": errors.VerifyError,
}


@dataclass
class BuildResult:
    """What a build did: per stage its key, state and seconds; the artifacts by name."""

    name: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    model_dir: str | None = None  # the weights (and, unless model.tokenizer says otherwise, the tokenizer)
    tokenizer_dir: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "stages": self.stages, "artifacts": self.artifacts,
                "seconds": round(self.seconds, 3)}


def execute(plan: Plan, store: Store, reporter: Reporter, *, redo: bool = False) -> BuildResult:
    """Build every stage of ``plan`` that is not cached; return the result. ``redo``: also rebuild every
    cached stage, compare its files with the cached entry's (row ``reproducible``, ``differs``) and keep
    the cached entry, so everything downstream goes on from the same bytes."""
    t_build = time.monotonic()
    if redo or any(sp.state == "build" for sp in plan.stages):
        store.clean_staging()
    result = BuildResult(plan.composed.name)
    entries: dict[str, Entry] = {}
    memo: dict[str, Any] = {}
    history = store.read_history(plan.manifest_id) if not store.readonly else {}
    history.update(manifest=str(plan.composed.source), stages=history.get("stages", {}))
    exports = [sp for sp in plan.stages if sp.name == "export" and sp.state == "build" and not redo]
    checked = bool(exports) and _check_memory(plan, store, {}, reporter)  # before anything, if weights are known
    for sp in plan.stages:
        t0 = time.monotonic()
        if sp in exports and not checked:
            _check_memory(plan, store, entries, reporter)  # random weights: once load has made them
        entry, state = (sp.entry, "cached") if sp.state == "cached" else (None, "build")
        extra: dict[str, Any] = {}
        if entry is not None and redo:
            reporter.emit({"event": "stage_started", "stage": sp.name, "key": sp.key, "reasons": ["--cache=redo"]})
            differs = _redo(sp, store, entry, entries, memo, reporter)
            state, extra = "redone", {"reproducible": not differs, "differs": differs}
        elif entry is None:
            try:
                reporter.emit({"event": "stage_started", "stage": sp.name, "key": sp.key, "reasons": sp.reasons})
                entry, state = _build(sp, store, entries, memo, reporter)
            except KeyboardInterrupt as exc:  # Ctrl-C while waiting for a lock, pulling or publishing
                if not getattr(exc, "qbuild_reported", False):
                    reporter.emit({"event": "stage_interrupted", "stage": sp.name, "key": sp.key,
                                   "seconds": round(time.monotonic() - t0, 3), "error": ""})
                raise
        assert entry is not None
        entries[sp.name] = entry
        seconds = round(time.monotonic() - t0, 3)
        reporter.emit({"event": f"stage_{state}", "stage": sp.name, "key": sp.key, "seconds": seconds, **extra})
        result.stages.append({"name": sp.name, "key": sp.key, "state": state, "seconds": seconds, **extra})
        for name, rel in entry.meta.get("artifacts", {}).items():
            result.artifacts[name] = str((entry.out / rel).resolve())
        if not store.readonly and history["stages"].get(sp.name, {}).get("key") != sp.key:
            history["stages"][sp.name] = {"key": sp.key, "identity": sp.identity, "reads": sp.reads}
            store.write_history(plan.manifest_id, history)
    load = plan.stage("load").resolved.params
    model_dir = Path(load.model.directory) if load.model.directory else entries["load"].out / "model"
    result.model_dir = str(model_dir)
    tok = load.tokenizer
    result.tokenizer_dir = str(tok.directory if tok.kind == "directory" else model_dir)
    result.seconds = time.monotonic() - t_build
    reporter.emit({"event": "summary", **result.summary()})
    return result


def _build(sp: StagePlan, store: Store, entries: dict[str, Entry], memo: dict[str, Any],
           reporter: Reporter) -> tuple[Entry, str]:
    def on_wait(holder: str) -> None:
        reporter.emit({"event": "lock_wait", "stage": sp.name, "key": sp.key, "holder": holder})

    with store.lock(sp.key, on_wait):
        entry, _problem = store.lookup(sp.name, sp.key)
        if entry is not None:  # another process built it while we waited
            return entry, "cached"
        if store.remote is None:
            return _run_stage(sp, store, entries, memo, reporter)
        with store.remote.lease(sp.key, on_wait):  # single flight across the caches sharing the remote
            pulled = _pull(sp, store, reporter)
            if pulled is not None:
                return pulled, "pulled"
            return _run_stage(sp, store, entries, memo, reporter)


def _redo(sp: StagePlan, store: Store, cached: Entry, entries: dict[str, Entry], memo: dict[str, Any],
          reporter: Reporter) -> list[str]:
    """Run the stage again into a staging directory and list the files whose bytes differ from the cached
    entry's files (missing or extra files included); the staging directory is then removed."""
    from qbuild.store.statcache import hash_file

    staging = store.new_staging(sp.key)
    ctx = StageContext(staging / "out", dict(entries), memo, store, dict(sp.resolved.sources),
                       lambda msg, frac: reporter.emit({"event": "progress", "stage": sp.name,
                                                        "message": msg, "fraction": frac}))
    try:
        try:
            sp.stage.run(sp.resolved.params, ctx)
        except errors.QBuildError:
            raise
        except Exception as exc:
            cls = _STAGE_ERRORS.get(sp.name, errors.StageError)
            raise cls(f"{sp.name} failed: {type(exc).__name__}: {exc}") from exc
        out = staging / "out"
        now = {f.relative_to(out).as_posix(): hash_file(f) for f in out.rglob("*") if f.is_file()}
    finally:
        remove_tree(staging)
    # the cached files' bytes as they are now (not their recorded digests): a cached file damaged since it
    # was published differs too
    before = {f.relative_to(cached.out).as_posix(): hash_file(f) for f in cached.out.rglob("*") if f.is_file()}
    return sorted(rel for rel in set(now) | set(before) if now.get(rel) != before.get(rel))


def _run_stage(sp: StagePlan, store: Store, entries: dict[str, Entry], memo: dict[str, Any],
               reporter: Reporter) -> tuple[Entry, str]:
    """Run the stage into a staging directory and publish it (and push it to the remote)."""
    staging = store.new_staging(sp.key)
    ctx = StageContext(staging / "out", dict(entries), memo, store, dict(sp.resolved.sources),
                       lambda msg, frac: reporter.emit({"event": "progress", "stage": sp.name,
                                                        "message": msg, "fraction": frac}))
    t0 = time.monotonic()
    _reset_peak_rss()
    start_rss = _rss()
    try:
        meta = sp.stage.run(sp.resolved.params, ctx)
    except BaseException as exc:
        remove_tree(staging)
        full = cache_write_error(exc, f"{sp.name}: writing {staging / 'out'}")  # a full disk, not a stage bug
        if full is not None:
            reporter.emit({"event": "stage_failed", "stage": sp.name, "key": sp.key,
                           "seconds": round(time.monotonic() - t0, 3), "error": str(full)})
            raise full from exc
        interrupted = isinstance(exc, KeyboardInterrupt)  # Ctrl-C: the stage did not fail, it was stopped
        reporter.emit({"event": "stage_interrupted" if interrupted else "stage_failed", "stage": sp.name,
                       "key": sp.key, "seconds": round(time.monotonic() - t0, 3), "error": str(exc)})
        if interrupted:
            exc.qbuild_reported = True  # type: ignore[attr-defined]
        if isinstance(exc, errors.QBuildError) or not isinstance(exc, Exception):
            raise
        cls = _STAGE_ERRORS.get(sp.name, errors.StageError)
        raise cls(f"{sp.name} failed: {type(exc).__name__}: {exc}") from exc
    record = {"identity": sp.identity, "meta": meta, "seconds": round(time.monotonic() - t0, 3),
              "peak_rss_bytes": _peak_rss(), "start_rss_bytes": start_rss,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if sp.name == "export":  # what the memory estimate of later exports is measured against
        from qbuild.plan.memory import model_dir_of_entries, weight_bytes

        directory = model_dir_of_entries(sp, entries)
        record["weight_bytes"] = weight_bytes(directory) if directory is not None else None
    entry = store.publish(sp.name, sp.key, staging, record)
    _push(entry, store, reporter)
    return entry, "built"


def _reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux: ``clear_refs`` 5 resets VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _check_memory(plan: Plan, store: Store, entries: dict[str, Entry], reporter: Reporter) -> bool:
    """PlanError when the export's estimated peak memory exceeds what is available; whether it could
    be estimated yet (the weights it reads are known)."""
    from qbuild.plan.memory import check, export_estimate

    estimate = export_estimate(plan, store.root, entries)
    if estimate is None:
        return False
    reporter.emit({"event": "memory_estimate", "stage": "export", "peak_bytes": estimate.peak,
                   "available_bytes": estimate.available, "text": estimate.describe()})
    check(estimate, plan.composed.name)
    return True


def _rss() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def _peak_rss() -> int | None:
    """This process's peak resident memory (bytes) since :func:`_reset_peak_rss`; the process's lifetime
    peak where the window cannot be reset; None where neither is known."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def _pull(sp: StagePlan, store: Store, reporter: Reporter) -> Entry | None:
    """The entry from the remote cache, digests checked, published locally; None on a miss or damage."""
    if store.remote is None:
        return None
    staging = store.new_staging(sp.key)
    record, problem = store.remote.pull(sp.name, sp.key, staging)
    if record is None:
        remove_tree(staging)
        if problem:
            reporter.emit({"event": "remote_damaged", "stage": sp.name, "key": sp.key, "problem": problem})
        return None
    keep = {k: v for k, v in record.items() if k not in ("format", "stage", "key", "files")}
    return store.publish(sp.name, sp.key, staging, {**keep, "pulled_from": store.remote.url})


def _push(entry: Entry, store: Store, reporter: Reporter) -> None:
    if store.remote is None:
        return
    try:
        store.remote.push(entry.stage, entry.key, entry.path, entry.record)
    except OSError as exc:  # the local build stands; the remote just lacks it
        reporter.emit({"event": "push_failed", "stage": entry.stage, "key": entry.key, "error": str(exc)})

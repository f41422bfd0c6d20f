"""Cache maintenance behind ``qbuild cache``: list, measure, verify, collect garbage, remove.

Every removal goes through :meth:`Store.remove_entry`: it takes the entry's build lock and its use
marker's lock without waiting, so an entry being built or read is never removed (it is skipped and
reported), and it moves the entry to ``trash/`` with one rename before deleting it, so a crash leaves
the cache consistent. Nothing here imports torch, transformers or onnx.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import os
import re
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qbuild.errors import CacheError
from qbuild.store.statcache import discard
from qbuild.store.store import RECORD, Store, open_lock, read_record, remove_tree

PARTS = ("compose", "history", "locks", "uses", "logs", "staging", "trash", "sweeps", "api")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str) -> int:
    """Bytes of ``500M``, ``2G``, ``1.5GiB``, ``300MB`` (K/M/G/T and KiB.. are powers of 1024; KB.. of 1000)."""
    m = _SIZE.match(text)
    if not m:
        raise CacheError(f"--max-size {text!r}: not a size; write e.g. 500M, 2G, 1.5GiB or 800MB")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    base = 1000 if suffix == "b" and unit else 1024
    return int(number * base ** " kmgtp".index(unit or " "))


def parse_age(text: str) -> float:
    """Seconds of ``30m``, ``12h``, ``7d``, ``2w``, ``90s``."""
    m = _AGE.match(text)
    if not m:
        raise CacheError(f"--older-than {text!r}: not an age; write e.g. 30m, 12h, 7d or 2w")
    return float(m.group(1)) * _AGE_UNITS[m.group(2).lower()]


def human_size(n: int) -> str:
    """``1.5 MiB``-style size."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file itself); 0 if absent."""
    try:
        if not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


@dataclass
class EntryInfo:
    """One published entry as ``qbuild cache ls`` shows it."""

    stage: str
    key: str
    path: Path
    size: int
    created: float
    last_use: float
    needed_by: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def _entry_dirs(root: Path) -> Iterable[tuple[str, str, Path]]:
    objects = root / "objects"
    for stage in sorted(p for p in _listdir(objects) if p.is_dir()):
        for path in sorted(p for p in _listdir(stage) if p.is_dir()):
            yield stage.name, path.name, path


def _listdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def histories(root: Path) -> dict[Path, dict[str, Any]]:
    """Each ``history/<manifest-id>.json`` file with its content ({} when unreadable)."""
    out: dict[Path, dict[str, Any]] = {}
    for f in sorted((root / "history").glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            data = {}
        out[f] = data if isinstance(data, dict) else {}
    return out


def _history_keys(data: dict[str, Any]) -> set[str]:
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return set()
    return {s["key"] for s in stages.values() if isinstance(s, dict) and isinstance(s.get("key"), str)}


def needed_by(root: Path) -> dict[str, list[str]]:
    """key -> the manifests whose last build used it (from the build history)."""
    out: dict[str, list[str]] = {}
    for data in histories(root).values():
        for key in _history_keys(data):
            out.setdefault(key, []).append(str(data.get("manifest", "?")))
    return {k: sorted(set(v)) for k, v in out.items()}


def entries(root: Path) -> list[EntryInfo]:
    """Every entry under ``objects/``, damaged ones included, with size, times and the manifests needing it."""
    users = needed_by(root)
    out = []
    for stage, key, path in _entry_dirs(root):
        record, _ = read_record(path)
        created = _parse_time(record.get("created")) if record else None
        created = created or _mtime(path / RECORD) or _mtime(path) or 0.0
        last_use = _mtime(root / "uses" / key) or created  # the marker is written at publish and each use
        out.append(EntryInfo(stage, key, path, tree_size(path), created, last_use, users.get(key, [])))
    return out


def _parse_time(text: Any) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def usage(root: Path) -> dict[str, Any]:
    """Bytes per stage (with entry counts), per other part of the cache, and in all."""
    stages: dict[str, dict[str, int]] = {}
    for info in entries(root):
        s = stages.setdefault(info.stage, {"entries": 0, "bytes": 0})
        s["entries"] += 1
        s["bytes"] += info.size
    parts = {name: tree_size(root / name) for name in PARTS}
    parts["statcache"] = sum(tree_size(Path(f"{root / 'statcache.sqlite'}{s}")) for s in ("", "-wal", "-shm"))
    known = sum(s["bytes"] for s in stages.values()) + sum(parts.values())
    total = tree_size(root)
    parts["other"] = max(0, total - known)
    return {"root": str(root), "stages": stages, "parts": parts, "total": total}


# ---- verify ---------------------------------------------------------------------------------
@dataclass
class Finding:
    """A damaged thing ``verify`` found: what, why, and whether it was removed."""

    what: str
    problem: str
    removed: bool


def verify(root: Path) -> tuple[list[Finding], list[str], int]:
    """Re-digest every entry's files from their bytes and check each record's seal, the compose memos,
    the history files and the stat cache; remove what is damaged (unless in use). Returns (findings,
    cleaned-up leftovers such as stale staging, entries checked)."""
    from qbuild.manifest import memo

    findings: list[Finding] = []
    store = Store(root, verify=True)
    try:
        checked = 0
        for stage, key, _path in _entry_dirs(root):
            checked += 1
            problem = store.check_entry(stage, key)
            if problem:
                findings.append(Finding(f"{stage}/{key}", problem, store.remove_entry(stage, key)))
        for f in sorted((root / "compose").glob("*.json")):
            if memo.load(f.parent, f.stem) is None:
                findings.append(Finding(f"compose/{f.name}", "memo unreadable or its digest does not match",
                                        _unlink(f)))
        for f, data in histories(root).items():
            if not data:
                findings.append(Finding(f"history/{f.name}", "history unreadable", _unlink(f)))
        problem = store.stats.check()
        if problem:
            store.stats.close()
            discard(store.stats.db_path)
            findings.append(Finding("statcache.sqlite", problem, True))
        cleaned = [f"staging/{name}" for name in store.clean_staging()]
    finally:
        store.close()
    return findings, cleaned, checked


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


# ---- gc -------------------------------------------------------------------------------------
@dataclass
class Item:
    """A removable thing gc ranks by last use: an entry, a compose memo, a log."""

    kind: str  # entry | memo | log
    name: str
    path: Path
    size: int
    last_use: float
    stage: str = ""
    key: str = ""


@dataclass
class GcReport:
    """What gc removed (or would remove), what it skipped, and the cache size before and after."""

    removed: list[Item] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in use: being built or read
    garbage: list[str] = field(default_factory=list)  # locks, markers, histories, staging left over
    before: int = 0
    after: int = 0
    kept: int = 0  # entries a --keep manifest needs

    def to_json(self) -> dict[str, Any]:
        return {"removed": [{"kind": i.kind, "name": i.name, "bytes": i.size, "last_use": i.last_use}
                            for i in self.removed],
                "skipped": self.skipped, "garbage": self.garbage, "before": self.before, "after": self.after,
                "kept": self.kept}


def kept_needs(root: Path, keep: Sequence[str]) -> tuple[set[str], set[str]]:
    """The stage keys and compose-memo keys of the ``--keep`` manifests (``"MANIFEST [KEY=VALUE ...]"``),
    from their plans against this cache (planning writes nothing and imports no torch)."""
    from qbuild.api import plan
    from qbuild.manifest import memo

    keys: set[str] = set()
    memos: set[str] = set()
    for text in keep:
        manifest, *overrides = shlex.split(text)
        p = plan(manifest, overrides, cache_dir=root)
        keys |= {s.key for s in p.stages}
        memo_key = memo.memo_key(p.composed.source, overrides)
        if memo_key:
            memos.add(memo_key)
    return keys, memos


def gc(root: Path, *, max_size: int | None = None, older_than: float | None = None, keep: Sequence[str] = (),
       dry_run: bool = False, now: float | None = None) -> GcReport:
    """Remove least recently used entries (and memos and logs) older than ``older_than`` seconds and/or
    until the cache holds at most ``max_size`` bytes; never one a ``keep`` manifest needs, nor one in use."""
    if max_size is None and older_than is None:
        raise CacheError("qbuild cache gc needs --max-size SIZE or --older-than AGE (or both)")
    now = time.time() if now is None else now
    kept_keys, kept_memos = kept_needs(root, keep)
    report = GcReport(before=tree_size(root))
    store = None if dry_run else Store(root)
    try:
        if store is not None:
            report.garbage += _collect_garbage(root, store)
        items, report.kept = _items(root, kept_keys, kept_memos)
        total = tree_size(root) if store is not None else report.before
        for item in sorted(items, key=lambda i: i.last_use):
            old = older_than is not None and item.last_use < now - older_than
            big = max_size is not None and total > max_size
            if not (old or big):
                continue
            if store is None or _remove(store, item):
                report.removed.append(item)
                total -= item.size
            else:
                report.skipped.append(item.name)
        if store is not None:
            report.garbage += _collect_garbage(root, store)
            store.stats.forget_missing(root / "objects")
    finally:
        if store is not None:
            store.close()
    report.after = total if dry_run else tree_size(root)
    return report


def _items(root: Path, kept_keys: set[str], kept_memos: set[str]) -> tuple[list[Item], int]:
    items = []
    kept = 0
    for e in entries(root):
        if e.key in kept_keys:
            kept += 1
            continue
        items.append(Item("entry", f"{e.stage}/{e.key}", e.path, e.size, e.last_use, e.stage, e.key))
    for f in sorted((root / "compose").glob("*.json")):
        if f.stem not in kept_memos:
            items.append(Item("memo", f"compose/{f.name}", f, tree_size(f), _mtime(f) or 0.0))
    for f in sorted(p for p in (root / "logs").rglob("*") if p.is_file()):
        items.append(Item("log", f"logs/{f.relative_to(root / 'logs')}", f, tree_size(f), _mtime(f) or 0.0))
    return items, kept


def _remove(store: Store, item: Item) -> bool:
    if item.kind == "entry":
        return store.remove_entry(item.stage, item.key)
    return _unlink(item.path)


def _collect_garbage(root: Path, store: Store) -> list[str]:
    """Stale staging, trash, lock files and use markers of absent entries, histories with no entry left."""
    removed = [f"staging/{n}" for n in store.clean_staging()]
    present = {key for _s, key, _p in _entry_dirs(root)}
    for folder, suffix in (("locks", ".lock"), ("uses", "")):
        for f in sorted(_listdir(root / folder)):
            key = f.name[: -len(suffix)] if suffix and f.name.endswith(suffix) else f.name
            if key not in present and _unlink_unlocked(f):
                removed.append(f"{folder}/{f.name}")
    for f, data in histories(root).items():
        if not (_history_keys(data) & present) and _unlink(f):
            removed.append(f"history/{f.name}")
    return removed


def _unlink_unlocked(path: Path) -> bool:
    """Unlink a lock file or use marker unless someone holds it."""
    try:
        fd = open_lock(path, shared=False, block=False)
    except OSError:
        return False
    if fd is None:
        return False
    try:
        return _unlink(path)
    finally:
        os.close(fd)


# ---- rm -------------------------------------------------------------------------------------
def resolve_keys(root: Path, prefixes: Sequence[str]) -> list[tuple[str, str]]:
    """(stage, key) of each entry a key or unique key prefix names; CacheError for unknown or ambiguous ones."""
    known = [(s, k) for s, k, _p in _entry_dirs(root)]
    out = []
    for prefix in prefixes:
        p = prefix.rsplit("/", 1)[-1]
        hits = sorted({(s, k) for s, k in known if p and k.startswith(p)})
        if not hits:
            raise CacheError(f"qbuild cache rm {prefix}: no entry in {root} has such a key",
                             hint="`qbuild cache ls` lists the entries")
        if len(hits) > 1:
            names = ", ".join(f"{s}/{k[:16]}" for s, k in hits[:5])
            raise CacheError(f"qbuild cache rm {prefix}: ambiguous, {len(hits)} entries match ({names}); "
                             "give more of the key")
        out.append(hits[0])
    return out


def rm(root: Path, prefixes: Sequence[str] = (), *, everything: bool = False) -> tuple[list[str], list[str]]:
    """Remove the named entries (or, with ``everything``, all entries and every other part qbuild keeps in
    the cache: memos, history, logs, locks, markers, staging of dead processes, sweeps, the stat cache).
    Files qbuild did not make are left alone. Returns (removed, skipped because in use)."""
    targets = [(s, k) for s, k, _p in _entry_dirs(root)] if everything else resolve_keys(root, prefixes)
    removed: list[str] = []
    skipped: list[str] = []
    if not root.is_dir():
        return removed, skipped
    store = Store(root)
    try:
        for stage, key in targets:
            (removed if store.remove_entry(stage, key) else skipped).append(f"{stage}/{key}")
        if everything:
            store.clean_staging()
            _collect_garbage(root, store)
            for name in ("compose", "history", "logs", "sweeps", "trash"):
                if (root / name).exists():
                    remove_tree(root / name)
                    removed.append(f"{name}/")
            store.stats.close()
            discard(store.stats.db_path)
            for d in [*_listdir(root / "objects"), *(root / n for n in ("objects", "locks", "uses", "staging"))]:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty: what is in use stays
    finally:
        store.close()
    if everything:
        with contextlib.suppress(OSError):
            root.rmdir()
    return removed, skipped


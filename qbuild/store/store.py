"""The cache directory: published entries, staging, locks and per-manifest build history.

Layout under the cache root::

    objects/<stage>/<key>/record.json   the record: identity, files with digests, meta
    objects/<stage>/<key>/out/...       the stage's output files (read-only)
    staging/<key>.<host>.<pid>.<rand>/  work in progress; renamed into objects/ on success
    locks/<key>.lock                    flock per key: one builder per key across processes
    history/<manifest-id>.json          the last build of each manifest (for plan's reasons)
    statcache.sqlite                    file digests by (path, size, mtime, inode)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.errors import CacheError
from qbuild.store.statcache import StatCache, hash_file

RECORD = "record.json"
RECORD_FORMAT = 1


def default_cache_dir() -> Path:
    """``$QBUILD_CACHE`` or ``./cache``."""
    return Path(os.environ.get("QBUILD_CACHE") or "cache")


@dataclass(frozen=True)
class Entry:
    """A published cache entry."""

    stage: str
    key: str
    path: Path
    record: dict[str, Any]

    @property
    def out(self) -> Path:
        return self.path / "out"

    @property
    def meta(self) -> dict[str, Any]:
        return self.record.get("meta", {})


class Store:
    """A content-addressed cache rooted at ``root``; ``readonly`` stores never write."""

    def __init__(self, root: Path, *, readonly: bool = False, remote: Any = None) -> None:
        self.root = Path(os.path.abspath(root))
        self.readonly = readonly
        self.remote = remote  # a qbuild.store.remote.DirectoryRemote shared with other caches, or None
        self.stats = StatCache(self.root / "statcache.sqlite", readonly=readonly)
        self._host = socket.gethostname()

    # ---- reading -------------------------------------------------------------------------
    def entry_path(self, stage: str, key: str) -> Path:
        return self.root / "objects" / stage / key

    def lookup(self, stage: str, key: str) -> tuple[Entry | None, str | None]:
        """The entry if present and intact; else (None, why) with why None for 'absent'."""
        path = self.entry_path(stage, key)
        try:
            record = json.loads((path / RECORD).read_text())
        except FileNotFoundError:
            return None, None if not path.exists() else "record missing"
        except (OSError, ValueError) as exc:
            return None, f"record unreadable ({exc.__class__.__name__})"
        problem = self._check_files(path, record)
        if problem:
            return None, problem
        return Entry(stage, key, path, record), None

    def _check_files(self, path: Path, record: dict[str, Any]) -> str | None:
        if record.get("format") != RECORD_FORMAT or record.get("key") != path.name:
            return "record does not match its key"
        for rel, info in record.get("files", {}).items():
            f = path / "out" / rel
            try:
                st = f.stat()
            except FileNotFoundError:
                return f"{rel} missing"
            if st.st_size != info["size"]:
                return f"{rel} size {st.st_size} != recorded {info['size']}"
            if self.stats.digest(f) != info["sha256"]:
                return f"{rel} digest mismatch"
        return None

    # ---- writing -------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.readonly:
            raise CacheError("internal: write to a read-only store")

    def new_staging(self, key: str) -> Path:
        """A fresh staging directory for building ``key``."""
        self._writable()
        name = f"{key}.{self._host}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        path = self.root / "staging" / name
        try:
            (path / "out").mkdir(parents=True)
        except OSError as exc:
            raise CacheError(f"cannot create staging directory in {self.root}: {exc}") from exc
        return path

    def publish(self, stage: str, key: str, staging: Path, record: dict[str, Any]) -> Entry:
        """Digest the staged files, write the record and rename into place atomically."""
        self._writable()
        files = {}
        for f in sorted(p for p in (staging / "out").rglob("*") if p.is_file()):
            files[f.relative_to(staging / "out").as_posix()] = {"size": f.stat().st_size, "sha256": hash_file(f)}
        record = {**record, "format": RECORD_FORMAT, "stage": stage, "key": key, "files": files}
        (staging / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
        for f in staging.rglob("*"):
            if f.is_file():
                f.chmod(0o444)
        final = self.entry_path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a corrupt entry being replaced: move it aside first
            self._discard(final)
        os.rename(staging, final)
        for d in [final, *(p for p in final.rglob("*") if p.is_dir())]:
            d.chmod(0o555)
        for rel, info in files.items():
            f = final / "out" / rel
            self.stats.remember(f, f.stat(), info["sha256"])
        return Entry(stage, key, final, record)

    def _discard(self, path: Path) -> None:
        trash = self.root / "trash" / f"{path.name}.{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash)
        remove_tree(trash)

    @contextlib.contextmanager
    def lock(self, key: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Exclusive per-key lock across processes; the kernel frees it if the holder dies."""
        self._writable()
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {self._host}".encode(), 0)
            yield
        finally:
            os.close(fd)

    def clean_staging(self) -> list[str]:
        """Remove staging directories left by dead processes on this host, and discarded entries."""
        removed = []
        for d in sorted((self.root / "trash").glob("*")):  # a replaced corrupt entry whose removal was cut short
            remove_tree(d)
        for d in sorted((self.root / "staging").glob("*")):
            parts = d.name.split(".")
            if len(parts) < 4 or parts[-3] != self._host:
                continue
            try:
                pid = int(parts[-2])
            except ValueError:
                continue
            if not _pid_alive(pid):
                remove_tree(d)
                removed.append(d.name)
        return removed

    # ---- history -------------------------------------------------------------------------
    def history_path(self, manifest_id: str) -> Path:
        return self.root / "history" / f"{manifest_id}.json"

    def read_history(self, manifest_id: str) -> dict[str, Any]:
        try:
            return json.loads(self.history_path(manifest_id).read_text())
        except (OSError, ValueError):
            return {}

    def write_history(self, manifest_id: str, data: dict[str, Any]) -> None:
        self._writable()
        path = self.history_path(manifest_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def close(self) -> None:
        self.stats.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_tree(path: Path) -> None:
    """rmtree that first restores write permission on read-only entries."""
    if not path.exists():
        return
    for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        with contextlib.suppress(OSError):
            d.chmod(stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)

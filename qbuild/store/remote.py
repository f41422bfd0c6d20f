"""A remote cache shared by several local caches: pull an entry on a local miss, push one after a build.

The remote holds entries in the local layout (``objects/<stage>/<key>/record.json`` + ``out/``). A push
writes the files first and the record last (the record is the commit: an entry without one is never
used), so a half-pushed entry is invisible. A pull copies every file the record lists into a local
staging directory, checking each file's size and sha256 against the record while copying; anything
missing or different makes the pull a miss that names the file, the stage is rebuilt, and its push
replaces the bad remote entry. This remote is a directory (a shared or mounted filesystem); the
object-store remotes of fsspec (S3, GCS) are not built yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qbuild.errors import CacheError

RECORD = "record.json"


class DirectoryRemote:
    """A remote cache in a directory (``--remote DIR``, ``QBUILD_REMOTE``, or a ``file://`` URL)."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = str(location)
        if "://" in text and not text.startswith("file://"):
            raise CacheError(f"--remote: {text}: only directory remotes (a path or file://) are supported yet")
        self.root = Path(text[len("file://"):] if text.startswith("file://") else text).absolute()
        self.url = str(self.root)

    def _entry(self, stage: str, key: str) -> Path:
        return self.root / "objects" / stage / key

    def has(self, stage: str, key: str) -> bool:
        """Whether the remote holds a committed entry (its record); its files are checked only by a pull."""
        return (self._entry(stage, key) / RECORD).is_file()

    def pull(self, stage: str, key: str, staging: Path) -> tuple[dict[str, Any] | None, str | None]:
        """Copy the entry's files into ``staging/out`` checking each digest: (its record, None), or
        (None, None) when the remote has no entry, or (None, why) when it is damaged."""
        entry = self._entry(stage, key)
        try:
            record = json.loads((entry / RECORD).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as exc:
            return None, f"remote record unreadable ({type(exc).__name__})"
        if record.get("key") != key or record.get("stage") != stage:
            return None, "remote record does not match its key"
        for rel, info in sorted(record.get("files", {}).items()):
            src, dest = entry / "out" / rel, staging / "out" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                sha, size = _copy_digest(src, dest)
            except FileNotFoundError:
                return None, f"remote {rel} missing"
            if size != info["size"] or sha != info["sha256"]:
                return None, f"remote {rel} differs from its record (sha256 {sha[:12]}, recorded {info['sha256'][:12]})"
        return record, None

    @contextlib.contextmanager
    def lease(self, key: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Single flight across machines sharing this remote: a lease file per key (see :class:`Lease`)."""
        lease = Lease(self.root / "leases" / f"{key}.lease")
        lease.acquire(on_wait)
        try:
            yield
        finally:
            lease.release()

    def push(self, stage: str, key: str, entry_path: Path, record: dict[str, Any]) -> None:
        """Files first, the record last (written to a temporary name, then renamed)."""
        final = self._entry(stage, key)
        (final / RECORD).unlink(missing_ok=True)  # a damaged entry being replaced: invisible from here on
        if (final / "out").exists():
            _remove(final / "out")
        shutil.copytree(entry_path / "out", final / "out")
        tmp = final / f".{RECORD}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, final / RECORD)


class Lease:
    """A lock that works where ``flock`` does not (network filesystems): a file created with O_EXCL that
    names its owner (host, pid), kept fresh by a heartbeat thread touching it every ``heartbeat`` s. A
    lease not touched for ``ttl`` s belongs to a dead or cut-off holder and is taken over: renamed to a
    unique name (one taker wins the rename), checked to be the stale lease that was seen (a fresh one
    taken by mistake is put back), removed, and the create retried."""

    def __init__(self, path: Path, ttl: float = 30.0, heartbeat: float = 5.0) -> None:
        self.path, self.ttl, self.heartbeat = path, ttl, heartbeat
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, on_wait: Callable[[str], None] | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released or taken over between our open and our read
                text, age = holder
                if age > self.ttl:
                    self._take_over(text)
                    continue
                if on_wait and not told:
                    on_wait(text)
                    told = True
                time.sleep(0.1)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.owner))
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return

    def _holder(self) -> tuple[str, float] | None:
        try:
            age = time.time() - self.path.stat().st_mtime
            return self.path.read_text(encoding="utf-8"), age
        except FileNotFoundError:
            return None

    def _take_over(self, seen: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another taker won
        if aside.read_text(encoding="utf-8") != seen:  # a fresh lease, created after we looked: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._holder()
        if holder is not None and json.loads(holder[0] or "{}").get("id") == self.owner["id"]:
            self.path.unlink(missing_ok=True)


def _copy_digest(src: Path, dest: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fi, open(dest, "wb") as fo:
        while chunk := fi.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
            fo.write(chunk)
    return h.hexdigest(), size


def _remove(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(path)


def open_remote(location: str | os.PathLike[str] | None) -> DirectoryRemote | None:
    """The remote named by ``location`` or ``$QBUILD_REMOTE``; None when neither is set."""
    location = location or os.environ.get("QBUILD_REMOTE")
    return DirectoryRemote(location) if location else None

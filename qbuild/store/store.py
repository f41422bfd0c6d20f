"""The cache directory: published entries, staging, locks and per-manifest build history.

Layout under the cache root::

    objects/<stage>/<key>/record.json   the record: identity, files with digests, meta, and its seal
    objects/<stage>/<key>/out/...       the stage's output files (read-only)
    staging/<key>.<host>.<pid>.<rand>/  work in progress; renamed into objects/ on success
    locks/<key>.lock                    flock per key: one builder (or remover) per key across processes
    uses/<key>                          empty marker: its mtime is the entry's last use; readers hold a
                                        shared flock on it, so gc and rm never remove an entry in use
    history/<manifest-id>.json          the last build of each manifest (for plan's reasons and gc --keep)
    compose/<memo-key>.json             composed configurations (qbuild.manifest.memo)
    trash/                              entries being removed (a removal cut short is finished later)
    statcache.sqlite                    file digests by (path, size, mtime, ctime, inode): an accelerator

Entries are read-only so that no tool modifies a cached artifact in place; ``qbuild cache rm`` removes
them. A record seals its own content: ``seal`` is the sha256 of the canonical JSON of the rest, so an
edited record is damage, like an edited file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
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
RECORD_FORMAT = 2  # 2: records carry a seal; format 1 records are treated as damaged and rebuilt
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded")


def default_cache_dir() -> Path:
    """``$QBUILD_CACHE`` or ``./cache``."""
    return Path(os.environ.get("QBUILD_CACHE") or "cache")


def seal(record: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a record without its ``seal`` field."""
    rest = {k: v for k, v in record.items() if k != "seal"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_write_error(exc: BaseException, what: str) -> CacheError | None:
    """A CacheError when ``exc`` (or an exception it was raised from) is a full disk, a file-size limit or
    an exhausted quota, naming the file when known; None for any other failure. ``what`` says which write
    failed (``"export: writing /cache/staging/<key>.../out"``)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 8 and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    tail = "nothing was published; free space (qbuild cache gc --max-size SIZE) or use another --cache-dir"
    for e in chain:
        if isinstance(e, OSError) and e.errno in _FULL:
            where = f" ({e.filename})" if e.filename is not None else ""
            return CacheError(f"{what}: {e.strerror}{where}; {tail}")
    for e in chain:  # a library that wrapped the OSError in its own error (safetensors, torch)
        text = next((t for t in _FULL_TEXT if t in str(e)), None)
        if text:
            return CacheError(f"{what}: {text} ({type(e).__name__}); {tail}")
    return None


def _os_error(exc: OSError, what: str) -> CacheError:
    where = f" ({exc.filename})" if exc.filename is not None else ""
    return cache_write_error(exc, what) or CacheError(f"{what}: {exc.strerror or exc}{where}")


_CACHE_DIR_HINT = "--cache-dir (or QBUILD_CACHE) names a directory, or a path where one can be created"


def check_cache_dir(root: Path, *, readonly: bool) -> None:
    """Raise one CacheError naming ``root`` and why when it cannot serve as a cache directory: not a directory,
    not readable, or (unless ``readonly``) not writable. A writable store creates a missing ``root``; a
    read-only one (``plan``) writes nothing, so a missing ``root`` is fine where a directory could hold it."""
    try:
        st = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        ancestor = _existing_ancestor(root)
        if not ancestor.is_dir():
            raise CacheError(f"cache directory {root}: cannot exist, {ancestor} is a file",
                             hint=_CACHE_DIR_HINT) from None
        if not readonly:
            _create_cache_dir(root, ancestor)
        return
    except OSError as exc:
        raise CacheError(f"cache directory {root}: {exc.strerror or exc}", hint=_CACHE_DIR_HINT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"cache directory {root}: not a directory (a file is there)", hint=_CACHE_DIR_HINT)
    need, what = (os.R_OK | os.X_OK, "readable") if readonly else (os.R_OK | os.W_OK | os.X_OK, "writable")
    if not os.access(root, need):
        raise CacheError(f"cache directory {root}: not {what} (permission denied or a read-only file system)",
                         hint=_CACHE_DIR_HINT)


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists (a directory, or the file that blocks it)."""
    parent = path.parent
    while parent != parent.parent and not os.path.lexists(parent):
        parent = parent.parent
    return parent


def _create_cache_dir(root: Path, ancestor: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cache directory {root}: cannot create it in {ancestor}: {exc.strerror or exc}",
                         hint=_CACHE_DIR_HINT) from None


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
    """A content-addressed cache rooted at ``root``; ``readonly`` stores never write; ``verify`` stores
    re-digest every file of an entry from its bytes at each lookup (never from the stat cache)."""

    def __init__(self, root: Path, *, readonly: bool = False, remote: Any = None, verify: bool = False) -> None:
        self.root = Path(os.path.abspath(root))
        self.readonly = readonly
        self.verify = verify
        self.remote = remote  # a qbuild.store.remote DirectoryRemote or FsspecRemote shared with other caches, or None
        check_cache_dir(self.root, readonly=readonly)
        self.stats = StatCache(self.root / "statcache.sqlite", readonly=readonly)
        self._host = socket.gethostname()
        self._read_locks: dict[str, int] = {}  # key -> fd holding a shared flock while this store uses the entry

    # ---- reading -------------------------------------------------------------------------
    def entry_path(self, stage: str, key: str) -> Path:
        return self.root / "objects" / stage / key

    def lookup(self, stage: str, key: str) -> tuple[Entry | None, str | None]:
        """The entry if present and intact; else (None, why) with why None for 'absent'. A hit in a
        writable store marks the entry used (``uses/<key>``) and holds it against removal until close()."""
        record, problem = self._checked(stage, key)
        if record is None:
            return None, problem
        path = self.entry_path(stage, key)
        if not self.readonly and not self._hold(key, path):
            return None, None  # removed by `qbuild cache gc/rm` just now
        return Entry(stage, key, path, record), None

    def check_entry(self, stage: str, key: str) -> str | None:
        """Why the entry is damaged (its record or a file named), or None when it is intact or absent.
        Unlike lookup() it neither marks the entry used nor holds it."""
        return self._checked(stage, key)[1]

    def _checked(self, stage: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
        path = self.entry_path(stage, key)
        record, problem = read_record(path)
        if record is None:
            return None, problem
        problem = self._check_record(path, stage, record) or self._check_files(path, record)
        return (None, problem) if problem else (record, None)

    def _check_record(self, path: Path, stage: str, record: dict[str, Any]) -> str | None:
        if record.get("format") != RECORD_FORMAT:
            return f"record format {record.get('format')!r} is not {RECORD_FORMAT} (an older qbuild's entry)"
        if record.get("seal") != seal(record):
            return "record seal mismatch (record.json was changed after it was written)"
        if record.get("key") != path.name or record.get("stage") != stage:
            return "record does not match its key"
        if not isinstance(record.get("files"), dict):
            return "record lists no files"
        return None

    def _check_files(self, path: Path, record: dict[str, Any]) -> str | None:
        files: dict[str, Any] = record["files"]
        for rel, info in files.items():
            f = path / "out" / rel
            if not isinstance(info, dict) or not {"size", "sha256"} <= info.keys():
                return f"record lists {rel} without its size and sha256"
            try:
                st = f.stat()
                if st.st_size != info["size"]:
                    return f"{rel} size {st.st_size} != recorded {info['size']}"
                sha = hash_file(f) if self.verify else self.stats.digest(f)
            except FileNotFoundError:
                return f"{rel} missing"
            except OSError as exc:
                return f"{rel} unreadable ({exc.strerror})"
            if sha != info["sha256"]:
                return f"{rel} digest mismatch"
        if self.verify:
            extra = sorted(set(_files_under(path / "out")) - set(files))
            if extra:
                return f"{extra[0]} is not in the record"
        return None

    def _hold(self, key: str, path: Path) -> bool:
        """Mark the entry used now and hold a shared flock on its use marker (``uses/<key>``) until close(),
        so that gc and rm leave it alone; False when it was removed meanwhile. Best effort otherwise."""
        if key not in self._read_locks:
            try:
                fd = open_lock(self.root / "uses" / key, shared=True, block=True)
            except OSError:
                return True  # a cache we cannot mark (full disk, permissions): used unmarked
            assert fd is not None
            if not (path / RECORD).exists():
                os.close(fd)
                return False
            self._read_locks[key] = fd
        with contextlib.suppress(OSError):
            os.utime(self.root / "uses" / key)
        return True

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
            raise _os_error(exc, f"cannot create a staging directory in {self.root}") from None
        return path

    def publish(self, stage: str, key: str, staging: Path, record: dict[str, Any]) -> Entry:
        """Digest the staged files, write the sealed record and rename into place atomically. A failed
        write (a full disk) removes the staging directory and raises CacheError: nothing is published."""
        self._writable()
        try:
            return self._publish(stage, key, staging, record)
        except OSError as exc:
            remove_tree(staging)
            raise _os_error(exc, f"cannot publish the {stage} entry {key[:12]}") from None

    def _publish(self, stage: str, key: str, staging: Path, record: dict[str, Any]) -> Entry:
        files = {}
        for f in sorted(p for p in (staging / "out").rglob("*") if p.is_file()):
            files[f.relative_to(staging / "out").as_posix()] = {"size": f.stat().st_size, "sha256": hash_file(f)}
        record = {**record, "format": RECORD_FORMAT, "stage": stage, "key": key, "files": files}
        record["seal"] = seal(record)
        _write(staging / RECORD, json.dumps(record, indent=1, sort_keys=True))
        for f in staging.rglob("*"):
            if f.is_file():
                f.chmod(0o444)
        final = self.entry_path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a damaged entry being replaced: move it aside first
            self._discard(final)
        os.rename(staging, final)
        for d in [final, *(p for p in final.rglob("*") if p.is_dir())]:
            d.chmod(0o555)
        for rel, info in files.items():
            f = final / "out" / rel
            self.stats.remember(f, f.stat(), info["sha256"])
        self._hold(key, final)
        return Entry(stage, key, final, record)

    def _discard(self, path: Path) -> None:
        trash = self.root / "trash" / f"{path.name}.{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash)
        remove_tree(trash)

    def remove_entry(self, stage: str, key: str) -> bool:
        """Remove an entry unless a builder holds its lock or a reader its use marker (False then): moved
        to trash atomically, then deleted; its use marker and lock file go too."""
        self._writable()
        lock, marker = self.root / "locks" / f"{key}.lock", self.root / "uses" / key
        fds: list[int] = []
        try:
            for f in (lock, marker):
                fd = open_lock(f, shared=False, block=False)
                if fd is None:
                    return False
                fds.append(fd)
            path = self.entry_path(stage, key)
            if path.exists():
                self._discard(path)
            for f in (marker, lock):  # safe while held: lockers check that the file they locked is the path
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        finally:
            for fd in fds:
                os.close(fd)
        return True

    @contextlib.contextmanager
    def lock(self, key: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Exclusive per-key lock across processes; the kernel frees it if the holder dies."""
        self._writable()
        path = self.root / "locks" / f"{key}.lock"
        try:
            fd = open_lock(path, shared=False, block=False)
            if fd is None:
                if on_wait:
                    on_wait(_holder(path))
                fd = open_lock(path, shared=False, block=True)
            assert fd is not None
        except OSError as exc:
            raise _os_error(exc, f"cannot take the lock {path}") from None
        try:
            with contextlib.suppress(OSError):  # who holds it, for waiters' messages
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
            owner = staging_owner(d.name)
            if owner is not None and owner[0] == self._host and not _pid_alive(owner[1]):
                remove_tree(d)
                removed.append(d.name)
        return removed

    # ---- history -------------------------------------------------------------------------
    def history_path(self, manifest_id: str) -> Path:
        return self.root / "history" / f"{manifest_id}.json"

    def read_history(self, manifest_id: str) -> dict[str, Any]:
        try:
            data = json.loads(self.history_path(manifest_id).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_history(self, manifest_id: str, data: dict[str, Any]) -> None:
        self._writable()
        path = self.history_path(manifest_id)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(tmp, json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _os_error(exc, f"cannot write the build history {path}") from None

    def close(self) -> None:
        """Release the entries this store held and close the stat cache."""
        for fd in self._read_locks.values():
            os.close(fd)
        self._read_locks.clear()
        self.stats.close()


def read_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """An entry's record as JSON (not yet checked): (record, None), (None, None) when the entry is
    absent, or (None, why)."""
    try:
        record = json.loads((path / RECORD).read_text())
    except FileNotFoundError:
        return None, None if not path.exists() else "record.json missing (a partial entry)"
    except (OSError, ValueError) as exc:
        return None, f"record.json unreadable ({exc.__class__.__name__})"
    if not isinstance(record, dict):
        return None, "record.json unreadable (not an object)"
    return record, None


def _write(path: Path, text: str) -> None:
    """Write a text file; an OSError names the file (a write() error alone does not)."""
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def staging_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a staging directory named ``<key>.<host>.<pid>.<rand>``; None if not such a name."""
    key, _, rest = name.partition(".")
    host, _, tail = rest.rpartition(".")
    host, _, pid = host.rpartition(".")
    if not key or not host or not tail or not pid.isdigit():
        return None
    return host, int(pid)


def open_lock(path: Path, *, shared: bool, block: bool) -> int | None:
    """An fd holding a flock on ``path`` (created if needed); None when ``block`` is False and it is held.
    Retries when the file was unlinked (by a remover) between our open and our lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if block else fcntl.LOCK_NB)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "another process"
    except OSError:
        return "another process"


def _files_under(out: Path) -> list[str]:
    return [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink()]


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

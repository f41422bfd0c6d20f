"""A remote cache shared by several local caches: pull an entry on a local miss, push one after a build.

The remote holds entries in the local layout (``objects/<stage>/<key>/record.json`` + ``out/``). A push
writes the files first and the record last (the record is the commit: an entry without one is never
used), so a half-pushed entry is invisible. A pull copies every file the record lists into a local
staging directory, checking each file's size and sha256 against the record while copying; anything
missing or different makes the pull a miss that names the file, the stage is rebuilt, and its push
replaces the bad remote entry.

Two kinds, chosen by :func:`open_remote` from the location (``--remote`` / the ``remote=`` argument, else
the manifest's ``cache.remote``, else ``$QBUILD_REMOTE``):

* :class:`DirectoryRemote`: a path or ``file://`` URL (a shared or mounted filesystem);
* :class:`FsspecRemote`: any other fsspec URL, e.g. ``s3://bucket/prefix`` (``pip install 'qbuild[s3]'``).
  Credentials and endpoints come only from the usual configuration of fsspec and the cloud SDK
  (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` / ``AWS_PROFILE``,
  ``~/.aws``, ``FSSPEC_S3_*`` or fsspec's config files); a URL that carries them is refused, so no
  secret reaches a manifest, a plan or a record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qbuild.errors import CacheError

RECORD = "record.json"


class DirectoryRemote:
    """A remote cache in a directory (``--remote DIR``, ``QBUILD_REMOTE``, or a ``file://`` URL)."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = str(location)
        if _is_url(text):
            raise CacheError(f"--remote {text}: not a directory; open it with open_remote() (an fsspec remote)")
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


class FsspecRemote:
    """A remote cache in an object store or any fsspec filesystem (``s3://bucket/prefix``, ``gs://...``).

    fsspec is imported here, only when such a URL is used. Credentials and the endpoint come from the
    environment and configuration fsspec and the cloud SDK read themselves (for S3: ``AWS_*`` variables,
    ``~/.aws``, ``FSSPEC_S3_*``); ``origin`` names where the URL came from, for messages."""

    def __init__(self, url: str, origin: str = "--remote") -> None:
        problem = url_problem(url)
        if problem:
            raise CacheError(f"{origin}: {problem}")
        self.url = url.rstrip("/")  # holds no secret (refused above): shown in plans and pulled records
        self.origin = origin
        protocol = url.split("::")[-1].split("://", 1)[0].lower()
        try:
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(self.url)
        except ImportError as exc:
            if protocol in ("s3", "s3a") or getattr(exc, "name", None) == "fsspec":
                raise CacheError(f"{origin} {self.url}: S3 remote caches need s3fs (with fsspec), which is not "
                                 "installed", hint="pip install 'qbuild[s3]' (or give --remote / cache.remote "
                                                   "a directory)") from None
            raise CacheError(f"{origin} {self.url}: {exc}",
                             hint="install that fsspec filesystem, or give --remote / cache.remote a "
                                  "directory") from None
        except ValueError as exc:  # an unknown protocol
            raise CacheError(f"{origin} {self.url}: {exc}",
                             hint="use a directory, file://, s3://bucket/prefix or another fsspec URL") from None
        self.root = root.rstrip("/")

    def _path(self, stage: str, key: str, *parts: str) -> str:
        return posixpath.join(self.root, "objects", stage, key, *parts)

    def _unreachable(self, exc: BaseException) -> CacheError:
        where = ("AWS_ENDPOINT_URL / AWS_PROFILE / AWS_ACCESS_KEY_ID, ~/.aws/config and ~/.aws/credentials"
                 if self.url.startswith(("s3://", "s3a://")) else "fsspec's configuration")
        return CacheError(f"{self.origin} {self.url}: cannot read the remote cache ({type(exc).__name__}: {exc})",
                          hint=f"check the endpoint and credentials ({where})")

    def has(self, stage: str, key: str) -> bool:
        """Whether the remote holds a committed entry (its record); its files are checked only by a pull."""
        path = self._path(stage, key, RECORD)
        try:
            self.fs.invalidate_cache(posixpath.dirname(path))  # another machine may have pushed since we listed
            return bool(self.fs.exists(path))
        except FileNotFoundError:
            return False
        except Exception as exc:  # an endpoint that cannot be reached, access denied: say so, never a traceback
            raise self._unreachable(exc) from exc

    def pull(self, stage: str, key: str, staging: Path) -> tuple[dict[str, Any] | None, str | None]:
        """Download the entry's files into ``staging/out`` checking each digest while streaming: (its record,
        None), or (None, None) when the remote has no entry, or (None, why) when it is damaged."""
        entry = self._path(stage, key)
        try:
            self.fs.invalidate_cache(entry)
            record = json.loads(self.fs.cat_file(posixpath.join(entry, RECORD)))
        except FileNotFoundError:
            return None, None
        except Exception as exc:  # unreadable JSON, or the remote failing mid-way: a miss that says why
            return None, f"remote record unreadable ({type(exc).__name__})"
        if not isinstance(record, dict) or record.get("key") != key or record.get("stage") != stage:
            return None, "remote record does not match its key"
        for rel, info in sorted(record.get("files", {}).items()):
            dest = staging / "out" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with self.fs.open(posixpath.join(entry, "out", rel), "rb") as fi:
                    sha, size = _stream_digest(fi, dest)
            except FileNotFoundError:
                return None, f"remote {rel} missing"
            except Exception as exc:
                return None, f"remote {rel} unreadable ({type(exc).__name__})"
            if size != info["size"] or sha != info["sha256"]:
                return None, f"remote {rel} differs from its record (sha256 {sha[:12]}, recorded {info['sha256'][:12]})"
        return record, None

    @contextlib.contextmanager
    def lease(self, key: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """No lease: an object store has no create-if-absent (O_EXCL) to build one on. Two machines may then
        both build a stage; that costs time, not correctness, since both push the same key and a pull
        checks every digest. The local cache's flock still gives single flight per cache, and the
        directory remote's :class:`Lease` covers machines sharing a filesystem."""
        yield

    def push(self, stage: str, key: str, entry_path: Path, record: dict[str, Any]) -> None:
        """Files first, the record last; the old record of a damaged entry is deleted before anything else.
        Raises OSError (naming the remote) when the store refuses; the local build stands."""
        entry = self._path(stage, key)
        try:
            self.fs.invalidate_cache(entry)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(posixpath.join(entry, RECORD))  # a damaged entry: invisible from here on
            out = posixpath.join(entry, "out")
            if self.fs.exists(out):
                self.fs.rm(out, recursive=True)
            for rel in sorted(record.get("files", {})):
                self.fs.put_file(str(entry_path / "out" / rel), posixpath.join(out, rel))
            self.fs.pipe_file(posixpath.join(entry, RECORD),
                              json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))
        except Exception as exc:
            raise OSError(f"{self.url}: {type(exc).__name__}: {exc}") from exc


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


def _stream_digest(fi: Any, dest: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(dest, "wb") as fo:
        while chunk := fi.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
            fo.write(chunk)
    return h.hexdigest(), size


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def url_problem(url: str) -> str | None:
    """Why a remote URL is refused (it carries a secret: ``user:password@`` or a query string), or None.
    The message shows the URL with the secret removed."""
    for part in url.split("::"):  # fsspec chains URLs: simplecache::s3://...
        if "://" not in part:
            continue
        parts = urlsplit(part)
        if "@" in parts.netloc:
            shown = f"{parts.scheme}://***@{parts.netloc.rsplit('@', 1)[1]}{parts.path}"
            return (f"the remote URL {shown} carries credentials (user:password@); refused: give them through "
                    "the environment or config files instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                    "AWS_PROFILE, ~/.aws/credentials, fsspec config)")
        if parts.query or parts.fragment:
            shown = f"{parts.scheme}://{parts.netloc}{parts.path}"
            return (f"the remote URL {shown} has a query string (?...), which may carry a token or signature; "
                    "refused: give credentials through the environment or config files instead")
    return None


def open_remote(location: str | os.PathLike[str] | None = None,
                configured: str | None = None) -> DirectoryRemote | FsspecRemote | None:
    """The remote cache to use: ``location`` (``--remote`` / ``remote=``), else ``configured`` (the
    manifest's ``cache.remote``), else ``$QBUILD_REMOTE``; None when none is set. A path or ``file://``
    URL is a :class:`DirectoryRemote`; any other URL an :class:`FsspecRemote` (fsspec imported then)."""
    for value, origin in ((location, "--remote"), (configured, "cache.remote"),
                          (os.environ.get("QBUILD_REMOTE"), "$QBUILD_REMOTE")):
        if value:
            text = os.fspath(value)
            return FsspecRemote(text, origin) if _is_url(text) else DirectoryRemote(text)
    return None

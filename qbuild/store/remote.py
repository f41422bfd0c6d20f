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

import hashlib
import json
import os
import shutil
import uuid
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

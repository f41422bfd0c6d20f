"""Digests of files remembered by (path, size, mtime, inode), so unchanged files are never re-read."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS files ("
    "path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT)"
)


def hash_file(path: Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class StatCache:
    """sqlite table of file digests; ``readonly`` keeps new digests in memory (plan writes nothing)."""

    def __init__(self, db_path: Path, *, readonly: bool = False) -> None:
        self.db_path = db_path
        self.readonly = readonly
        self._memory: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._conn: sqlite3.Connection | None = None
        self.hashed: list[str] = []  # paths actually read (tests and reports)

    def _db(self) -> sqlite3.Connection | None:
        if self._conn is None:
            if self.readonly:
                if not self.db_path.exists():
                    return None
                uri = f"file:{self.db_path}?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, timeout=30)
            else:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.db_path, timeout=30)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute(_SCHEMA)
                self._conn.commit()
        return self._conn

    def lookup(self, path: Path, st: os.stat_result) -> str | None:
        """The remembered digest if the file's stat is unchanged, else None."""
        p = str(path)
        mem = self._memory.get(p)
        if mem and mem[0] == _stat_key(st):
            return mem[1]
        db = self._db()
        if db is None:
            return None
        try:
            row = db.execute("SELECT size, mtime_ns, inode, sha256 FROM files WHERE path=?", (p,)).fetchone()
        except sqlite3.OperationalError:  # table not created yet (read-only open of a new db)
            return None
        if row and tuple(row[:3]) == _stat_key(st):
            return row[3]
        return None

    def remember(self, path: Path, st: os.stat_result, sha: str) -> None:
        """Store a digest for a file at its current stat."""
        self._memory[str(path)] = (_stat_key(st), sha)
        if self.readonly:
            return
        db = self._db()
        assert db is not None
        db.execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
            (str(path), st.st_size, st.st_mtime_ns, st.st_ino, sha),
        )
        db.commit()

    def digest(self, path: Path) -> str:
        """Digest of a file, read only when its (path, size, mtime, inode) is new."""
        path = Path(os.path.abspath(path))
        st = path.stat()
        sha = self.lookup(path, st)
        if sha is None:
            sha = hash_file(path)
            self.hashed.append(str(path))
            self.remember(path, st, sha)
        return sha

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

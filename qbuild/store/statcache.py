"""Digests of files remembered by (path, size, mtime, ctime, inode), so unchanged files are never re-read.

The stat cache is a pure accelerator: every answer it gives could be recomputed from the files.
So it never fails a build and never gives a wrong answer:

* each row carries a check digest of its own fields; a row that does not match it is ignored;
* ctime is part of the stat key: rewriting a file's bytes and restoring its mtime still moves its
  ctime, which no user call can set back (git's index does the same);
* any ``sqlite3.DatabaseError`` (a corrupt or truncated file, a full disk, a locked database) makes
  it drop the database for this process and continue in memory; a database found corrupt is moved
  aside (removed) by a writable store, so the next process starts a fresh one.

Bytes that change with no metadata change at all (bit rot) are found only by reading them:
``Store(verify=True)`` and ``qbuild cache verify`` never consult this cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from pathlib import Path

_TABLE = "digests"  # format 2: the ctime column and a per-row check (format 1's table "files" is dropped)
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {_TABLE} ("
    "path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER, "
    "sha256 TEXT, row_check TEXT)"
)

StatKey = tuple[int, int, int, int]


def hash_file(path: Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _row_check(path: str, key: StatKey, sha: str) -> str:
    return hashlib.sha256(f"{path}\0{key}\0{sha}".encode()).hexdigest()[:16]


class StatCache:
    """sqlite table of file digests; ``readonly`` keeps new digests in memory (plan writes nothing)."""

    def __init__(self, db_path: Path, *, readonly: bool = False) -> None:
        self.db_path = db_path
        self.readonly = readonly
        self._memory: dict[str, tuple[StatKey, str]] = {}
        self._conn: sqlite3.Connection | None = None
        self._broken = False  # the database failed: this process goes on in memory
        self.hashed: list[str] = []  # paths actually read (tests and reports)
        self.problem: str | None = None  # why the database was dropped, if it was

    def _open(self) -> sqlite3.Connection | None:
        if self.readonly:
            if not self.db_path.exists():
                return None
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # a corrupt header fails here
            return conn
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db_path, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name='files'").fetchone():
                conn.execute("DROP TABLE files")
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def _db(self) -> sqlite3.Connection | None:
        if self._conn is None and not self._broken:
            try:
                self._conn = self._open()
            except (sqlite3.DatabaseError, OSError) as exc:
                self._drop(exc)
        return self._conn

    def _drop(self, exc: BaseException) -> None:
        """Give up the database for this process; remove it when it is corrupt and ours to write."""
        self.problem = f"{self.db_path}: {type(exc).__name__}: {exc}"
        self._broken = True
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        corrupt = isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)
        if corrupt and not self.readonly:
            discard(self.db_path)

    def lookup(self, path: Path, st: os.stat_result) -> str | None:
        """The remembered digest if the file's stat is unchanged, else None."""
        p, key = str(path), _stat_key(st)
        mem = self._memory.get(p)
        if mem and mem[0] == key:
            return mem[1]
        db = self._db()
        if db is None:
            return None
        try:
            row = db.execute(f"SELECT size, mtime_ns, ctime_ns, inode, sha256, row_check FROM {_TABLE} "
                             "WHERE path=?", (p,)).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):  # (a read-only open of a database a writer has not set up)
                self._drop(exc)
            return None
        except sqlite3.DatabaseError as exc:
            self._drop(exc)
            return None
        if row and tuple(row[:4]) == key and row[5] == _row_check(p, key, str(row[4])):
            return str(row[4])
        return None

    def remember(self, path: Path, st: os.stat_result, sha: str) -> None:
        """Store a digest for a file at its current stat (in memory only if the database is unusable)."""
        p, key = str(path), _stat_key(st)
        self._memory[p] = (key, sha)
        if self.readonly:
            return
        db = self._db()
        if db is None:
            return
        try:
            db.execute(f"INSERT OR REPLACE INTO {_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (p, *key, sha, _row_check(p, key, sha)))
            db.commit()
        except sqlite3.DatabaseError as exc:  # disk full, corrupt, locked too long: an accelerator never fails
            self._drop(exc)

    def digest(self, path: Path) -> str:
        """Digest of a file, read only when its (path, size, mtime, ctime, inode) is new."""
        path = Path(os.path.abspath(path))
        st = path.stat()
        sha = self.lookup(path, st)
        if sha is None:
            sha = hash_file(path)
            self.hashed.append(str(path))
            self.remember(path, st, sha)
        return sha

    def forget_missing(self, prefix: Path) -> int:
        """Delete the rows of files under ``prefix`` that no longer exist; the number deleted."""
        db = None if self.readonly else self._db()
        if db is None:
            return 0
        try:
            rows = db.execute(f"SELECT path FROM {_TABLE} WHERE path >= ? AND path < ?",
                              (f"{prefix}/", f"{prefix}0")).fetchall()
            gone = [(r[0],) for r in rows if not os.path.lexists(r[0])]
            db.executemany(f"DELETE FROM {_TABLE} WHERE path=?", gone)
            db.commit()
        except sqlite3.DatabaseError as exc:
            self._drop(exc)
            return 0
        return len(gone)

    def check(self) -> str | None:
        """sqlite's own integrity check of the database: None when sound (or absent), else the problem."""
        if not self.db_path.exists():
            return None
        try:
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
            try:
                rows = conn.execute("PRAGMA quick_check").fetchall()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:3])

    def close(self) -> None:
        """Close the database connection (the in-memory digests stay)."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None


def discard(db_path: Path) -> None:
    """Remove a database file with its WAL and shared-memory files (a fresh one is made on next open)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            os.unlink(f"{db_path}{suffix}")

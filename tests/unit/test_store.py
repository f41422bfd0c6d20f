"""The content-addressed store: publish, read-only entries, corruption, locks, stale staging."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbuild.store import StatCache, Store, hash_file
from qbuild.store.store import RECORD_FORMAT, cache_write_error, remove_tree, seal, staging_owner

KEY = "ab" * 32


def _publish(store: Store, key: str = KEY, text: str = "hello") -> None:
    staging = store.new_staging(key)
    (staging / "out" / "sub").mkdir()
    (staging / "out" / "sub" / "a.txt").write_text(text)
    store.publish("export", key, staging, {"meta": {"artifacts": {"a": "sub/a.txt"}}})


def test_publish_then_lookup(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.lookup("export", KEY) == (None, None)
    _publish(store)
    entry, problem = store.lookup("export", KEY)
    assert problem is None and entry is not None
    assert (entry.out / "sub" / "a.txt").read_text() == "hello"
    assert entry.record["files"]["sub/a.txt"]["size"] == 5
    assert not list((tmp_path / "staging").iterdir())
    assert not os.access(entry.out / "sub" / "a.txt", os.W_OK) or os.geteuid() == 0
    assert (entry.out / "sub" / "a.txt").stat().st_mode & 0o222 == 0


def test_corrupt_file_is_a_miss_with_reason(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _publish(store)
    f = store.entry_path("export", KEY) / "out" / "sub" / "a.txt"
    f.chmod(0o644)
    f.write_text("jello")  # same size, other bytes
    fresh = Store(tmp_path, readonly=True)
    entry, problem = fresh.lookup("export", KEY)
    assert entry is None and problem == "sub/a.txt digest mismatch"
    f.unlink()
    assert fresh.lookup("export", KEY)[1] == "sub/a.txt missing"
    _publish(store)  # republishing replaces the corrupt entry
    assert store.lookup("export", KEY)[0] is not None


def test_unchanged_files_are_not_reread(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _publish(store)
    fresh = Store(tmp_path)
    assert fresh.lookup("export", KEY)[0] is not None
    assert fresh.stats.hashed == []


def test_readonly_store_writes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "c", readonly=True)
    assert store.lookup("export", KEY) == (None, None)
    store.stats.digest(Path(__file__))
    assert not (tmp_path / "c").exists()


def _hold_lock(root: str, key: str, started: mp.Event, hold: float) -> None:  # type: ignore[valid-type]
    with Store(Path(root)).lock(key):
        started.set()
        time.sleep(hold)


def test_lock_waits_for_holder(tmp_path: Path) -> None:
    started = mp.Event()
    proc = mp.Process(target=_hold_lock, args=(str(tmp_path), KEY, started, 0.5))
    proc.start()
    assert started.wait(10)
    waited: list[str] = []
    t0 = time.monotonic()
    with Store(tmp_path).lock(KEY, on_wait=waited.append):
        elapsed = time.monotonic() - t0
    proc.join()
    assert waited and "pid" in waited[0]
    assert elapsed > 0.2


def test_lock_of_killed_holder_is_taken_over(tmp_path: Path) -> None:
    code = ("import sys,time; from pathlib import Path; from qbuild.store import Store\n"
            "with Store(Path(sys.argv[1])).lock(sys.argv[2]):\n print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), KEY], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    with Store(tmp_path).lock(KEY):
        assert time.monotonic() - t0 < 5


def test_stale_staging_of_dead_process_is_removed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    mine = store.new_staging(KEY)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = mine.parent / mine.name.replace(f".{os.getpid()}.", f".{pid}.")
    stale.mkdir()
    assert store.clean_staging() == [stale.name]
    assert mine.exists()


def test_remove_tree_handles_read_only_entries(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _publish(store)
    remove_tree(store.entry_path("export", KEY))
    assert not store.entry_path("export", KEY).exists()


def _edit_record(store: Store, change) -> None:  # noqa: ANN001
    rec = store.entry_path("export", KEY) / "record.json"
    rec.parent.chmod(0o755)
    rec.chmod(0o644)
    rec.write_text(change(rec.read_text()))


@pytest.mark.parametrize(("bad", "why"), [
    (lambda _t: "{", "record.json unreadable"),
    (lambda _t: "[1]", "record.json unreadable"),
    (lambda t: t.replace('"a": "sub/a.txt"', '"a": "other.txt"'), "record seal mismatch"),
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "seal"} | {"format": 1}),
     "record format 1 is not 2"),
])
def test_bad_record_is_reported(tmp_path: Path, bad, why: str) -> None:  # noqa: ANN001
    store = Store(tmp_path)
    _publish(store)
    _edit_record(store, bad)
    entry, problem = Store(tmp_path, readonly=True).lookup("export", KEY)
    assert entry is None and problem and problem.startswith(why)
    _publish(store)  # the next build replaces the damaged entry
    assert store.lookup("export", KEY)[0] is not None


def test_record_seal_covers_meta(tmp_path: Path) -> None:
    """meta (the artifacts' names downstream stages open) is covered by the seal and by nothing else."""
    store = Store(tmp_path)
    _publish(store)
    record = store.lookup("export", KEY)[0].record  # type: ignore[union-attr]
    assert record["seal"] == seal(record) and record["format"] == RECORD_FORMAT
    _edit_record(store, lambda t: t.replace('"a": "sub/a.txt"', '"a": "sub/b.txt"'))
    assert store.lookup("export", KEY) == (None, "record seal mismatch (record.json was changed after it was written)")
    edited = json.loads((store.entry_path("export", KEY) / "record.json").read_text())
    _edit_record(store, lambda _t: json.dumps({**edited, "seal": seal(edited)}))  # a deliberate re-seal
    assert store.lookup("export", KEY)[0].meta == {"artifacts": {"a": "sub/b.txt"}}  # type: ignore[union-attr]


def _flip_keep_mtime(f: Path, offset: int = 1) -> None:
    """Change one byte in place and put the mtime back, to the nanosecond."""
    st = f.stat()
    f.chmod(0o644)
    with open(f, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))
    f.chmod(st.st_mode)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size


def test_flip_with_mtime_restored_is_found(tmp_path: Path) -> None:
    """The stat key holds ctime, which no user call restores: the default lookup re-reads the file."""
    store = Store(tmp_path)
    _publish(store)
    _flip_keep_mtime(store.entry_path("export", KEY) / "out" / "sub" / "a.txt")
    assert Store(tmp_path).lookup("export", KEY) == (None, "sub/a.txt digest mismatch")


def test_verify_store_reads_bytes_even_when_the_stat_cache_agrees(tmp_path: Path) -> None:
    """Bit rot changes bytes and no metadata: only verify=True (which never asks the stat cache) sees it."""
    store = Store(tmp_path)
    _publish(store)
    f = store.entry_path("export", KEY) / "out" / "sub" / "a.txt"
    good = store.stats.digest(f)
    _flip_keep_mtime(f)
    store.stats.remember(Path(os.path.abspath(f)), f.stat(), good)  # the stat cache vouches for the old bytes
    assert Store(tmp_path).lookup("export", KEY)[0] is not None
    verifying = Store(tmp_path, verify=True)
    assert verifying.lookup("export", KEY) == (None, "sub/a.txt digest mismatch")
    assert verifying.stats.hashed == []


def test_verify_store_reports_a_file_not_in_the_record(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _publish(store)
    out = store.entry_path("export", KEY) / "out"
    out.chmod(0o755)
    (out / "extra.bin").write_text("x")
    assert Store(tmp_path).lookup("export", KEY)[0] is not None
    assert Store(tmp_path, verify=True).lookup("export", KEY) == (None, "extra.bin is not in the record")


@pytest.mark.parametrize("damage", ["header", "page", "truncate", "garbage"])
def test_corrupt_stat_cache_is_rebuilt_and_answers_right(tmp_path: Path, damage: str) -> None:
    store = Store(tmp_path)
    _publish(store)
    for i in range(50):  # a database of a few pages
        store.stats.digest(_file(tmp_path / "files" / f"f{i}.txt", f"file {i}"))
    store.close()
    db = tmp_path / "statcache.sqlite"
    data = bytearray(db.read_bytes())
    if damage == "header":
        data[0] ^= 0xFF
    elif damage == "page":
        data[4096 + 8: 4096 + 40] = bytes(32)
    elif damage == "truncate":
        data = data[: len(data) // 2 + 100]
    else:
        data = bytearray(b"x" * len(data))
    db.write_bytes(bytes(data))
    reader = Store(tmp_path, readonly=True)  # plan: never writes, never fails
    assert reader.lookup("export", KEY)[0] is not None
    assert db.read_bytes() == bytes(data)
    fresh = Store(tmp_path)  # a build: the database is replaced when found corrupt
    assert fresh.lookup("export", KEY)[0] is not None
    assert reader.stats.problem and fresh.stats.problem, "the damage was not seen"
    f = _file(tmp_path / "files" / "f3.txt", "changed")
    assert fresh.stats.digest(f) == hash_file(f)
    fresh.close()
    again = Store(tmp_path)
    assert again.stats.check() is None
    assert again.stats.digest(f) == hash_file(f)


def _file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_stat_cache_row_changed_in_place_is_not_trusted(tmp_path: Path) -> None:
    stats = StatCache(tmp_path / "s.sqlite")
    f = _file(tmp_path / "a.txt", "hello")
    stats.digest(f)
    stats.close()
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        conn.execute("UPDATE digests SET sha256=?", ("0" * 64,))
    fresh = StatCache(tmp_path / "s.sqlite")
    assert fresh.digest(f) == hash_file(f) and fresh.hashed == [str(f)]


def test_stat_cache_write_failure_goes_on_in_memory(tmp_path: Path) -> None:
    """A database that cannot be written (here: a directory in its place) never fails a digest."""
    (tmp_path / "s.sqlite").mkdir()
    stats = StatCache(tmp_path / "s.sqlite")
    f = _file(tmp_path / "a.txt", "hello")
    assert stats.digest(f) == hash_file(f) and stats.problem
    assert stats.digest(f) == hash_file(f) and stats.hashed == [str(f)]


_PUBLISH_UNDER_LIMIT = """
import resource, signal, sys
from pathlib import Path
from qbuild.errors import CacheError
from qbuild.store import Store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
store = Store(Path(sys.argv[1]))
staging = store.new_staging(sys.argv[2])
(staging / "out" / "a.txt").write_text("small")
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # the record is larger than 200 bytes
try:
    store.publish("export", sys.argv[2], staging, {"meta": {"pad": "x" * 300}})
except CacheError as exc:
    print(exc)
    print("staging left:", list(staging.parent.iterdir()))
"""


def test_full_disk_while_publishing_is_a_cache_error_and_publishes_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _PUBLISH_UNDER_LIMIT, str(tmp_path), KEY],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    message, staging = proc.stdout.splitlines()
    assert message.startswith(f"cannot publish the export entry {KEY[:12]}: File too large (")
    assert "record.json" in message and "nothing was published" in message
    assert staging == "staging left: []"
    store = Store(tmp_path)
    assert store.lookup("export", KEY) == (None, None)
    _publish(store)
    assert store.lookup("export", KEY)[0] is not None


def test_cache_write_error_finds_full_disks_inside_wrapped_errors() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/c/staging/x/out/model.onnx")
        except OSError as exc:
            raise RuntimeError("export failed") from exc
    except RuntimeError as wrapped:
        err = cache_write_error(wrapped, "export: writing /c/staging/x/out")
    assert err is not None and str(err).startswith(
        "export: writing /c/staging/x/out: No space left on device (/c/staging/x/out/model.onnx); nothing")
    assert cache_write_error(RuntimeError("I/O error: File too large (os error 27)"), "load") is not None
    assert cache_write_error(ValueError("bad shape"), "export") is None


def test_remove_entry_skips_entries_being_read_or_built(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _publish(store)
    store.close()
    reader = Store(tmp_path)
    assert reader.lookup("export", KEY)[0] is not None  # holds the entry until close()
    remover = Store(tmp_path)
    assert remover.remove_entry("export", KEY) is False
    reader.close()
    with Store(tmp_path).lock(KEY):
        assert remover.remove_entry("export", KEY) is False
    assert remover.remove_entry("export", KEY) is True
    assert remover.lookup("export", KEY) == (None, None)
    assert not (tmp_path / "uses" / KEY).exists() and not (tmp_path / "locks" / f"{KEY}.lock").exists()


def test_a_hit_marks_the_last_use(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _publish(store)
    marker = tmp_path / "uses" / KEY
    os.utime(marker, (1_000_000, 1_000_000))
    Store(tmp_path, readonly=True).lookup("export", KEY)
    assert marker.stat().st_mtime == 1_000_000
    Store(tmp_path).lookup("export", KEY)
    assert marker.stat().st_mtime > time.time() - 60


@pytest.mark.parametrize(("name", "owner"), [
    (f"{KEY}.host.123.abcd1234", ("host", 123)),
    (f"{KEY}.node-1.cluster.example.org.77.abcd1234", ("node-1.cluster.example.org", 77)),
    (f"{KEY}.host.notapid.abcd1234", None),
    ("junk", None),
])
def test_staging_owner_handles_dotted_host_names(name: str, owner: tuple[str, int] | None) -> None:
    assert staging_owner(name) == owner


def test_interrupted_discard_is_cleaned_up(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _publish(store)
    leftover = tmp_path / "trash" / f"{KEY}.deadbeef"
    leftover.parent.mkdir()
    os.rename(store.entry_path("export", KEY), leftover)  # as if killed between rename and rmtree
    store.clean_staging()
    assert not leftover.exists()

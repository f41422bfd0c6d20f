"""The content-addressed store: publish, read-only entries, corruption, locks, stale staging."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbuild.store import Store
from qbuild.store.store import remove_tree

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


@pytest.mark.parametrize("bad", ["{", '{"format": 1, "key": "other"}'])
def test_bad_record_is_reported(tmp_path: Path, bad: str) -> None:
    store = Store(tmp_path)
    _publish(store)
    rec = store.entry_path("export", KEY) / "record.json"
    rec.parent.chmod(0o755)
    rec.chmod(0o644)
    rec.write_text(bad)
    entry, problem = store.lookup("export", KEY)
    assert entry is None and problem and ("unreadable" in problem or "does not match" in problem)


def test_interrupted_discard_is_cleaned_up(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _publish(store)
    leftover = tmp_path / "trash" / f"{KEY}.deadbeef"
    leftover.parent.mkdir()
    os.rename(store.entry_path("export", KEY), leftover)  # as if killed between rename and rmtree
    store.clean_staging()
    assert not leftover.exists()

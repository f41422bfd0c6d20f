"""A remote cache shared by several local caches (a directory remote; real builds, real processes)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import TINY, json_lines, run_qbuild


def build(cache: Path, remote: Path, *extra: str) -> tuple[dict[str, str], list[dict]]:
    proc = run_qbuild(str(TINY), "--json", "--remote", str(remote), *extra, cache=cache, check=True)
    events = json_lines(proc.stdout)
    return {s["name"]: s["state"] for s in events[-1]["stages"]}, events


def remote_entry(remote: Path, stage: str) -> Path:
    (entry,) = (remote / "objects" / stage).iterdir()
    return entry


def test_a_second_cache_pulls_everything_and_a_damaged_remote_file_is_rebuilt_and_repushed(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    first, _ = build(tmp_path / "a", remote)
    assert set(first.values()) == {"built"}
    assert len(list(remote.glob("objects/*/*/record.json"))) == 4  # every build pushed
    planned = json.loads(run_qbuild("plan", str(TINY), "--json", "--remote", str(remote), cache=tmp_path / "b",
                                    check=True).stdout)
    assert all(s["state"] == "build" and s["reasons"][0].startswith(f"in the remote cache {remote}: will be pulled")
               for s in planned["stages"])
    assert not (tmp_path / "b" / "objects").exists()  # plan wrote nothing
    second, _ = build(tmp_path / "b", remote)
    assert second == {"load": "pulled", "export": "pulled", "compile": "pulled", "verify": "pulled"}
    again, _ = build(tmp_path / "b", remote)
    assert set(again.values()) == {"cached"}  # pulled entries are ordinary local entries
    a_files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a" / "objects").rglob("*"))
    b_files = sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b" / "objects").rglob("*"))
    assert a_files == b_files

    compiled = remote_entry(remote, "compile") / "out" / "model.onnx"
    data = bytearray(compiled.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped byte in the remote copy
    compiled.chmod(0o644)
    compiled.write_bytes(bytes(data))
    third, events = build(tmp_path / "c", remote)
    assert third == {"load": "pulled", "export": "pulled", "compile": "built", "verify": "pulled"}
    damaged = [e for e in events if e.get("event") == "remote_damaged"]
    assert [e["stage"] for e in damaged] == ["compile"]
    assert "model.onnx differs from its record" in damaged[0]["problem"]
    fourth, _ = build(tmp_path / "d", remote)  # the rebuild was pushed over the damaged entry
    assert set(fourth.values()) == {"pulled"}


def test_an_entry_without_its_record_is_never_used(tmp_path: Path) -> None:
    """A push writes the record last: files without a record (a push cut short) are a miss."""
    remote = tmp_path / "remote"
    build(tmp_path / "a", remote, "verify.enabled=false")
    (remote_entry(remote, "compile") / "record.json").unlink()
    states, events = build(tmp_path / "b", remote, "verify.enabled=false")
    assert states == {"load": "pulled", "export": "pulled", "compile": "built"}
    assert not [e for e in events if e.get("event") == "remote_damaged"]  # absent, not damaged
    assert json.loads((remote_entry(remote, "compile") / "record.json").read_text())["stage"] == "compile"


def test_a_remote_that_is_not_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_qbuild(str(TINY), "--remote", "s3://bucket/cache", cache=tmp_path / "a")
    assert proc.returncode == 8 and "only directory remotes" in proc.stderr and "Traceback" not in proc.stderr


def test_four_builders_on_two_caches_sharing_a_remote_build_each_stage_once(tmp_path: Path) -> None:
    """Two caches stand for two machines (flock does not reach across them); the remote's lease does."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    remote = tmp_path / "remote"
    procs = [subprocess.Popen([sys.executable, "-m", "qbuild", str(TINY), "--json", "--remote", str(remote)],
                              env={**os.environ, "QBUILD_CACHE": str(tmp_path / f"cache{i % 2}")}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    states = [{s["name"]: s["state"] for s in json_lines(out)[-1]["stages"]} for out, _ in outs]
    for stage in ("load", "export", "compile", "verify"):
        column = sorted(s[stage] for s in states)
        assert column.count("built") == 1, (stage, column)
        assert set(column) <= {"built", "cached", "pulled"}
    assert not list((remote / "leases").glob("*.lease"))  # every lease released


def test_a_lease_is_exclusive_and_an_expired_one_is_taken_over(tmp_path: Path) -> None:
    import json as _json
    import os
    import threading
    import time

    from qbuild.store.remote import Lease

    path = tmp_path / "k.lease"
    first = Lease(path, ttl=30, heartbeat=0.05)
    first.acquire()
    got: list[float] = []
    waits: list[str] = []
    second = Lease(path, ttl=30, heartbeat=0.05)
    t = threading.Thread(target=lambda: (second.acquire(waits.append), got.append(time.monotonic())))
    t0 = time.monotonic()
    t.start()
    time.sleep(0.5)
    assert not got and waits and _json.loads(waits[0])["pid"] == os.getpid()  # waiting, told who holds it
    first.release()
    t.join(5)
    assert got and got[0] - t0 >= 0.5
    second.release()
    assert not path.exists()
    path.write_text(_json.dumps({"host": "gone", "pid": 1, "id": "dead"}))  # a holder that died
    old = time.time() - 60
    os.utime(path, (old, old))
    third = Lease(path, ttl=30)
    third.acquire()  # taken over at once
    assert _json.loads(path.read_text())["id"] == third.owner["id"]
    third.release()

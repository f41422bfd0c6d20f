"""A remote cache shared by several local caches: a directory remote, and an S3 remote served by moto on
loopback (real builds, real processes; s3fs finds the server through the environment only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TINY, json_lines, run_qbuild


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


def test_a_remote_of_an_unknown_protocol_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_qbuild(str(TINY), "--remote", "nosuch://bucket/cache", cache=tmp_path / "a")
    assert proc.returncode == 8 and "Protocol not known: nosuch" in proc.stderr and "Traceback" not in proc.stderr


def test_the_remote_argument_wins_over_cache_remote_which_wins_over_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qbuild.store.remote import DirectoryRemote, open_remote

    monkeypatch.setenv("QBUILD_REMOTE", str(tmp_path / "env"))
    chosen = [open_remote(tmp_path / "arg", str(tmp_path / "manifest")), open_remote(None, str(tmp_path / "manifest")),
              open_remote(None, None)]
    assert all(isinstance(r, DirectoryRemote) for r in chosen)
    assert [Path(r.url).name for r in chosen if r is not None] == ["arg", "manifest", "env"]
    monkeypatch.delenv("QBUILD_REMOTE")
    assert open_remote(None, None) is None
    # a directory remote never imports fsspec (checked in a fresh process)
    proc = subprocess.run([sys.executable, "-c", "import sys; from qbuild.store.remote import open_remote; "
                           "open_remote('/tmp/r'); print('fsspec' in sys.modules)"],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.strip() == "False"


def test_cache_remote_changes_no_stage_key(tmp_path: Path) -> None:
    from qbuild.api import plan

    def keys(*overrides: str) -> dict[str, str]:
        return {s.name: s.key for s in plan(TINY, list(overrides), cache_dir=tmp_path / "cache").stages}

    base = keys()
    assert keys(f"cache.remote={tmp_path / 'remote'}") == base
    assert keys(f"cache.remote={tmp_path / 'elsewhere'}") == base  # and S3: test_cache_remote_in_the_manifest_...


def test_an_s3_remote_without_s3fs_names_the_extra_to_install(tmp_path: Path) -> None:
    """s3fs absent (an import that fails, as on a machine without it): one clear CacheError, no traceback."""
    code = ("import sys; sys.modules['s3fs'] = None; from qbuild.cli import main; "
            f"sys.exit(main([{str(TINY)!r}, '--remote', 's3://bucket/prefix', 'verify.enabled=false']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "QBUILD_CACHE": str(tmp_path / "a")})
    assert proc.returncode == 8, proc.stderr
    assert "pip install 'qbuild[s3]'" in proc.stderr and "--remote" in proc.stderr and "Traceback" not in proc.stderr


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


# --- an S3 remote: moto's S3 server on loopback ------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 and the environment that points boto / s3fs at it (nothing else)."""
    pytest.importorskip("s3fs", reason="pip install 'qbuild[s3]'")
    pytest.importorskip("moto", reason="pip install 'qbuild[s3]'")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log lines in the test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _host, port = server.get_host_and_port()
    none = str(Path(os.devnull))
    yield {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_CONFIG_FILE": none,
           "AWS_SHARED_CREDENTIALS_FILE": none, "AWS_EC2_METADATA_DISABLED": "true", "AWS_PROFILE": "",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    server.stop()


@pytest.fixture
def s3(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fresh bucket; ``env`` for qbuild subprocesses, ``client`` (boto3) to look at or damage objects."""
    import boto3

    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE")
    bucket = f"qbuild-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    return {"env": {k: v for k, v in s3_server.items() if k != "AWS_PROFILE"}, "client": client, "bucket": bucket,
            "url": f"s3://{bucket}/team/cache"}


def s3_build(s3: dict[str, Any], cache: Path, *extra: str, check: bool = True,
             remote: str | None = None) -> tuple[dict[str, str], list[dict]]:
    args = ["--remote", remote or s3["url"]] if remote != "" else []
    proc = run_qbuild(str(TINY), "--json", *args, *extra, cache=cache, env=s3["env"], check=check)
    events = json_lines(proc.stdout)
    return {s["name"]: s["state"] for s in events[-1]["stages"]}, events


def s3_keys(s3: dict[str, Any], prefix: str = "team/cache/") -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def s3_entry(s3: dict[str, Any], stage: str) -> str:
    (record,) = [k for k in s3_keys(s3) if k.startswith(f"team/cache/objects/{stage}/") and k.endswith("/record.json")]
    return record[: -len("record.json")]


def test_s3_a_second_cache_pulls_everything_and_a_damaged_remote_file_is_rebuilt_and_repushed(
        s3: dict[str, Any], tmp_path: Path) -> None:
    first, _ = s3_build(s3, tmp_path / "a")
    assert set(first.values()) == {"built"}
    assert len([k for k in s3_keys(s3) if k.endswith("/record.json")]) == 4  # every build pushed
    planned = json.loads(run_qbuild("plan", str(TINY), "--json", "--remote", s3["url"], cache=tmp_path / "b",
                                    env=s3["env"], check=True).stdout)
    assert all(s["state"] == "build" and s["reasons"][0].startswith(f"in the remote cache {s3['url']}: will be pulled")
               for s in planned["stages"])
    assert not (tmp_path / "b" / "objects").exists()  # plan wrote nothing
    second, _ = s3_build(s3, tmp_path / "b")
    assert second == {"load": "pulled", "export": "pulled", "compile": "pulled", "verify": "pulled"}
    again, _ = s3_build(s3, tmp_path / "b")
    assert set(again.values()) == {"cached"}  # pulled entries are ordinary local entries
    a_files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a" / "objects").rglob("*"))
    b_files = sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b" / "objects").rglob("*"))
    assert a_files == b_files
    record = json.loads(next((tmp_path / "b" / "objects" / "compile").glob("*/record.json")).read_text())
    assert record["pulled_from"] == s3["url"]

    name = s3_entry(s3, "compile") + "out/model.onnx"
    data = bytearray(s3["client"].get_object(Bucket=s3["bucket"], Key=name)["Body"].read())
    data[len(data) // 2] ^= 0x01  # one flipped byte in the remote copy
    s3["client"].put_object(Bucket=s3["bucket"], Key=name, Body=bytes(data))
    third, events = s3_build(s3, tmp_path / "c")
    assert third == {"load": "pulled", "export": "pulled", "compile": "built", "verify": "pulled"}
    damaged = [e for e in events if e.get("event") == "remote_damaged"]
    assert [e["stage"] for e in damaged] == ["compile"]
    assert "model.onnx differs from its record" in damaged[0]["problem"]
    assert not [e for e in events if e.get("event") == "push_failed"]
    fourth, _ = s3_build(s3, tmp_path / "d")  # the rebuild was pushed over the damaged entry
    assert set(fourth.values()) == {"pulled"}


def test_s3_an_entry_without_its_record_is_never_used(s3: dict[str, Any], tmp_path: Path) -> None:
    """A push writes the record last: files without a record (a push cut short) are a miss, not damage."""
    s3_build(s3, tmp_path / "a", "verify.enabled=false")
    record = s3_entry(s3, "compile") + "record.json"
    s3["client"].delete_object(Bucket=s3["bucket"], Key=record)
    states, events = s3_build(s3, tmp_path / "b", "verify.enabled=false")
    assert states == {"load": "pulled", "export": "pulled", "compile": "built"}
    assert not [e for e in events if e.get("event") == "remote_damaged"]  # absent, not damaged
    body = s3["client"].get_object(Bucket=s3["bucket"], Key=record)["Body"].read()
    assert json.loads(body)["stage"] == "compile"  # pushed again


def test_cache_remote_in_the_manifest_works_like_remote_and_changes_no_key(s3: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    first, _ = s3_build(s3, tmp_path / "a", "verify.enabled=false", f"cache.remote={s3['url']}", remote="")
    assert set(first.values()) == {"built"}
    assert len([k for k in s3_keys(s3) if k.endswith("/record.json")]) == 3
    second, _ = s3_build(s3, tmp_path / "b", "verify.enabled=false", f"cache.remote={s3['url']}", remote="")
    assert set(second.values()) == {"pulled"}

    def plan_keys(*extra: str) -> dict[str, str]:
        proc = run_qbuild("plan", str(TINY), "--json", "verify.enabled=false", *extra, cache=tmp_path / "a",
                          env=s3["env"], check=True)
        return {s["name"]: s["key"] for s in json.loads(proc.stdout)["stages"]}

    assert plan_keys() == plan_keys(f"cache.remote={s3['url']}") == plan_keys(f"cache.remote=s3://{s3['bucket']}/x")
    # --remote wins over cache.remote: this build pulls from the URL given on the command line
    third, _ = s3_build(s3, tmp_path / "c", "verify.enabled=false", f"cache.remote=s3://{s3['bucket']}/empty")
    assert set(third.values()) == {"pulled"}
    assert not s3_keys(s3, prefix="empty/")


@pytest.mark.parametrize("where", ["--remote", "cache.remote", "$QBUILD_REMOTE"])
def test_a_remote_url_with_credentials_is_refused_in_one_line(tmp_path: Path, where: str) -> None:
    url = "s3://AKIAEXAMPLE:s3cr3tValue@bucket/prefix"
    args = {"--remote": ["--remote", url], "cache.remote": [f"cache.remote={url}"], "$QBUILD_REMOTE": []}[where]
    env = {"QBUILD_REMOTE": url} if where == "$QBUILD_REMOTE" else {}
    proc = run_qbuild(str(TINY), "verify.enabled=false", *args, cache=tmp_path / "a", env=env)
    assert proc.returncode == (2 if where == "cache.remote" else 8), proc.stderr  # ManifestError / CacheError
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and "carries credentials" in lines[0], proc.stderr
    assert "s3cr3tValue" not in proc.stdout + proc.stderr and "AKIAEXAMPLE" not in proc.stdout + proc.stderr
    written = [f for f in (tmp_path / "a").rglob("*") if f.is_file()]
    assert not [f for f in written if b"s3cr3tValue" in f.read_bytes()]  # not remembered anywhere (compose memo)


def test_s3_a_missing_bucket_is_a_reported_miss(s3: dict[str, Any], tmp_path: Path) -> None:
    states, events = s3_build(s3, tmp_path / "a", "verify.enabled=false", remote="s3://no-such-bucket-qbuild/c")
    assert set(states.values()) == {"built"}  # the local build stands
    failed = [e for e in events if e.get("event") == "push_failed"]
    assert [e["stage"] for e in failed] == ["load", "export", "compile"]
    assert all("s3://no-such-bucket-qbuild/c" in e["error"] and "bucket does not exist" in e["error"]
               for e in failed), failed


def test_s3_an_unreachable_endpoint_is_a_clear_error(s3: dict[str, Any], tmp_path: Path) -> None:
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**s3["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}
    proc = run_qbuild(str(TINY), "--remote", s3["url"], "verify.enabled=false", cache=tmp_path / "a", env=env)
    assert proc.returncode == 8, proc.stderr
    assert "cannot read the remote cache" in proc.stderr and "AWS_ENDPOINT_URL" in proc.stderr
    assert "Traceback" not in proc.stderr and "testing" not in proc.stderr

"""``qbuild cache ls|du|verify|gc|rm`` on a real cache holding builds of three manifests."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from qbuild.errors import CacheError
from qbuild.store import Store
from qbuild.store.maintenance import parse_age, parse_size, tree_size
from tests.conftest import ROOT, TINY
from tests.func.test_cache_integrity import CACHE_ERROR, cache_cmd

GPT2 = ROOT / "manifests" / "tiny-gpt2.yaml"
BERT = ROOT / "manifests" / "tiny-bert.yaml"
QUICK = ["verify.enabled=false"]


@pytest.fixture(scope="module")
def warm_three(warm_tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama (all stages), tiny-gpt2 and tiny-bert (without verify) built into one cache."""
    from qbuild.api import build

    cache = tmp_path_factory.mktemp("three") / "cache"
    shutil.copytree(warm_tiny_cache, cache, symlinks=True)
    build(GPT2, QUICK, cache_dir=cache)
    build(BERT, QUICK, cache_dir=cache)
    return cache


@pytest.fixture
def cache(warm_three: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(warm_three, dst, symlinks=True)
    return dst


def keys_of(cache: Path, manifest: Path, *overrides: str) -> dict[str, str]:
    from qbuild.api import plan

    return {s.key: s.name for s in plan(manifest, overrides, cache_dir=cache).stages}


def present(cache: Path) -> set[str]:
    return {p.name for p in (cache / "objects").glob("*/*")}


def age(cache: Path, keys: object, seconds: float) -> None:
    """Make the entries' last use ``seconds`` ago."""
    t = time.time() - seconds
    for key in keys:  # type: ignore[attr-defined]
        marker = cache / "uses" / key
        marker.touch()
        os.utime(marker, (t, t))


def fully_cached(cache: Path, manifest: Path, *overrides: str) -> bool:
    from qbuild.api import plan

    return all(s.state == "cached" for s in plan(manifest, overrides, cache_dir=cache).stages)


def test_ls_shows_entries_and_the_manifests_that_need_them(cache: Path) -> None:
    proc = cache_cmd("ls", "--json", cache=cache)
    assert proc.returncode == 0, proc.stderr
    rows = {e["key"]: e for e in json.loads(proc.stdout)["entries"]}
    assert set(rows) == present(cache) and len(rows) == 10
    for key in keys_of(cache, GPT2, *QUICK):
        assert rows[key]["needed_by"] == [str(GPT2)]
        assert rows[key]["size"] > 0 and rows[key]["last_use"] >= rows[key]["created"] > 0
    text = cache_cmd("ls", cache=cache).stdout
    assert str(BERT) in text and "10 entries" in text


def test_du_totals_per_stage_and_part(cache: Path) -> None:
    du = json.loads(cache_cmd("du", "--json", cache=cache).stdout)
    assert {s: v["entries"] for s, v in du["stages"].items()} == {"load": 3, "export": 3, "compile": 3, "verify": 1}
    assert du["total"] == tree_size(cache)
    assert du["total"] == sum(v["bytes"] for v in du["stages"].values()) + sum(du["parts"].values())
    assert du["parts"]["statcache"] > 0 and du["parts"]["history"] > 0 and du["parts"]["compose"] > 0


def test_gc_max_size_removes_least_recently_used_and_keeps_a_kept_manifest(cache: Path) -> None:
    gpt2, llama, bert = keys_of(cache, GPT2, *QUICK), keys_of(cache, TINY), keys_of(cache, BERT, *QUICK)
    age(cache, gpt2, 4 * 3600)  # the oldest, but kept
    age(cache, bert, 3 * 3600)
    age(cache, llama, 2 * 3600)
    bert_bytes = sum(tree_size(p) for p in (cache / "objects").glob("*/*") if p.name in bert)
    limit = tree_size(cache) - bert_bytes
    proc = cache_cmd("gc", "--max-size", str(limit), "--keep", f"{GPT2} {QUICK[0]}", "--json", cache=cache)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {r["name"].split("/")[1] for r in report["removed"]} == set(bert)
    assert tree_size(cache) <= limit == report["before"] - bert_bytes and report["after"] == tree_size(cache)
    assert present(cache) == set(gpt2) | set(llama)
    assert fully_cached(cache, GPT2, *QUICK) and fully_cached(cache, TINY)
    assert not any((cache / "locks" / f"{k}.lock").exists() or (cache / "uses" / k).exists() for k in bert)
    assert [h for h in (cache / "history").glob("*.json") if str(BERT) in h.read_text()] == []

    proc = cache_cmd("gc", "--max-size", "1K", "--keep", f"{GPT2} {QUICK[0]}", cache=cache)
    assert proc.returncode == 0 and "still over" in proc.stdout
    assert present(cache) == set(gpt2)
    assert fully_cached(cache, GPT2, *QUICK)


def test_gc_dry_run_removes_nothing(cache: Path) -> None:
    before = sorted((str(p), p.stat().st_mtime_ns) for p in cache.rglob("*"))
    proc = cache_cmd("gc", "--max-size", "1", "--dry-run", "--json", cache=cache)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    memos = len(list((cache / "compose").glob("*.json")))
    assert report["dry_run"] and len(report["removed"]) == 10 + memos and report["after"] < report["before"]
    assert "would remove" in cache_cmd("gc", "--older-than", "0s", "--dry-run", cache=cache).stdout
    assert sorted((str(p), p.stat().st_mtime_ns) for p in cache.rglob("*")) == before


def test_gc_older_than_removes_old_entries_and_their_history(cache: Path) -> None:
    llama = keys_of(cache, TINY)
    age(cache, llama, 10 * 86400)
    for p in (cache / "compose").glob("*.json"):
        os.utime(p, (time.time() - 10 * 86400,) * 2)
    proc = cache_cmd("gc", "--older-than", "7d", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert present(cache).isdisjoint(llama) and len(present(cache)) == 6
    assert not list((cache / "compose").glob("*.json"))
    assert [h for h in (cache / "history").glob("*.json") if str(TINY) in h.read_text()] == []
    assert not any((cache / "locks" / f"{k}.lock").exists() for k in llama)
    assert fully_cached(cache, BERT, *QUICK)


def test_gc_and_rm_leave_entries_being_read_or_built(cache: Path) -> None:
    bert = keys_of(cache, BERT, *QUICK)
    load_key = next(k for k, s in bert.items() if s == "load")
    export_key = next(k for k, s in bert.items() if s == "export")
    reader = Store(cache)
    assert reader.lookup("load", load_key)[0] is not None  # a build reading it holds it until close()
    try:
        with Store(cache).lock(export_key):  # as a builder replacing it would
            proc = cache_cmd("gc", "--older-than", "0s", "--json", cache=cache)
            assert proc.returncode == 0, proc.stderr
            assert sorted(json.loads(proc.stdout)["skipped"]) == [f"export/{export_key}", f"load/{load_key}"]
            assert present(cache) == {load_key, export_key}
            proc = cache_cmd("rm", load_key[:10], cache=cache)
            assert proc.returncode == CACHE_ERROR and "in use" in proc.stderr
    finally:
        reader.close()
    assert cache_cmd("rm", load_key[:10], cache=cache).returncode == 0
    assert present(cache) == {export_key}


def test_rm_by_key_prefix_and_all(cache: Path) -> None:
    llama = keys_of(cache, TINY)
    compile_key = next(k for k, s in llama.items() if s == "compile")
    proc = cache_cmd("rm", compile_key[:8], cache=cache)
    assert proc.returncode == 0 and f"removed compile/{compile_key}" in proc.stdout
    assert compile_key not in present(cache) and len(present(cache)) == 9
    from qbuild.api import plan

    assert [s.name for s in plan(TINY, cache_dir=cache).stages if s.state == "build"] == ["compile"]
    missing = cache_cmd("rm", "ffffffffffff", cache=cache)
    assert missing.returncode == CACHE_ERROR and "no entry" in missing.stderr and "Traceback" not in missing.stderr
    assert cache_cmd("rm", cache=cache).returncode == CACHE_ERROR
    assert (next((cache / "objects").glob("*/*")) / "out").stat().st_mode & 0o222 == 0  # entries are read-only
    (cache / "mine.txt").write_text("not qbuild's")
    proc = cache_cmd("rm", "--all", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in cache.iterdir()] == ["mine.txt"]
    assert "qbuild cache rm --all" in cache_cmd("--help", cache=cache).stdout


def test_verify_of_a_sound_cache_exits_0(cache: Path) -> None:
    proc = cache_cmd("verify", cache=cache)
    assert proc.returncode == 0 and "10 entries checked from their bytes, 0 damaged" in proc.stdout


def test_gc_needs_a_rule_and_sizes_and_ages_parse(tmp_path: Path) -> None:
    proc = cache_cmd("gc", cache=tmp_path)
    assert proc.returncode == CACHE_ERROR and "needs --max-size SIZE or --older-than AGE" in proc.stderr
    assert parse_size("500M") == 500 * 2**20 and parse_size("2G") == 2 * 2**30
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("800MB") == 800 * 10**6
    assert parse_size("1234") == 1234
    assert parse_age("30m") == 1800 and parse_age("12h") == 43200 and parse_age("7d") == 7 * 86400
    for bad in ("5 parsecs", "-1G", ""):
        with pytest.raises(CacheError, match="not a size"):
            parse_size(bad)
    with pytest.raises(CacheError, match="not an age"):
        parse_age("7 days")


def test_a_missing_cache_directory_is_named(tmp_path: Path) -> None:
    proc = cache_cmd("ls", cache=tmp_path / "nowhere")
    assert proc.returncode == CACHE_ERROR and f"no cache directory at {tmp_path / 'nowhere'}" in proc.stderr
    assert not (tmp_path / "nowhere").exists()

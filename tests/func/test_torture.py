"""Proofs under kill -9 and under concurrency, bounded for CI (bench/torture.py runs the long version).

* 20 builds killed with SIGKILL at random moments of every stage (two kill loops side by side, each on
  its own cache): after each kill no entry is corrupt or partial (re-digested here and by
  ``qbuild cache verify``) and the next build succeeds with the reference keys and compiled bytes.
* 8 processes building one manifest at once on a fresh cache: all succeed, each stage is built exactly
  once, and all 8 get the same keys and compiled bytes. (tests/func/test_cli.py's
  test_concurrent_builders_build_each_stage_once proves the same with 2 processes.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import torture
from tests.conftest import ROOT, json_lines

pytestmark = pytest.mark.slow
KILLS = 20
SEED = 8


def _table(kills: list[torture.Kill]) -> str:
    rows = [f"  loop {k.loop} kill at {k.at:6.3f}s aimed at {k.target:<8} landed in {k.landed:<8}"
            f"{' CORRUPT ' + '; '.join(k.problems) + ' ' + str(k.verify) if k.corrupt else ''}"
            f"{' NEXT BUILD FAILED: ' + k.rebuild_problem if k.rebuild_failed else ''}" for k in kills]
    return "\n".join([f"{len(kills)} kills: {torture.summarise(kills, 0)['by_stage']}", *rows])


def test_sigkill_at_random_moments_never_corrupts_the_cache(tmp_path: Path) -> None:
    ref, kills = torture.torture(KILLS, SEED, 2, torture.Launcher(), tmp_path)
    table = _table(kills)
    print(table)  # shown with -s or -rA: where each kill landed
    assert len(kills) == KILLS, table
    assert not [k for k in kills if k.corrupt], table
    assert not [k for k in kills if k.rebuild_failed], table
    assert len({k.landed for k in kills} & set(torture.STAGES)) >= 3, table
    # some kills caught a stage writing: its staging directory stayed behind, and was no entry
    assert any(c.startswith("staging/") for k in kills for c in k.verify.get("cleaned", [])), table
    assert set(ref.keys) == set(torture.STAGES)


def test_eight_builders_build_each_stage_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "qbuild", str(torture.MANIFEST), *torture.OVERRIDES, "--json",
           "--cache-dir", str(cache)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "QBUILD_FULL_ERROR": "1"}) for _ in range(8)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err[-2000:] for _, err in outs]
    summaries = [json_lines(out)[-1] for out, _ in outs]
    for i, stage in enumerate(torture.STAGES):
        states = sorted(s["stages"][i]["state"] for s in summaries)
        assert states.count("built") == 1 and states.count("cached") == 7, (stage, states)
        records = list((cache / "objects" / stage).glob("*/record.json"))
        assert len(records) == 1, (stage, records)
    keys = {tuple(s["key"] for s in summary["stages"]) for summary in summaries}
    assert len(keys) == 1, keys
    compiled = [torture.compiled_digests(cache, summary["stages"][2]["key"]) for summary in summaries]
    artifacts = [{n: torture.tree_digests(Path(p)) for n, p in s["artifacts"].items()} for s in summaries]
    assert all(c == compiled[0] for c in compiled) and compiled[0]
    assert all(a == artifacts[0] for a in artifacts)
    assert torture.check_cache(cache) == []
    rc, report = torture.cache_verify(cache)
    assert rc == 0 and report["checked"] == 4 and report["damaged"] == [], report

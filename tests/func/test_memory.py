"""Memory before it hurts: per-stage peak RSS in records, the export estimate, the refusal before a build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_qbuild


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qbuild.models.source import init_random

    model_dir = tmp_path_factory.mktemp("ckpt") / "model"
    init_random("llama", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 256}, 0,
                "float32", model_dir)
    return model_dir


def manifest(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "ckpt.yaml"
    path.write_text(f"defaults: [_self_]\nmodel:\n  path: {model_dir}\nverify:\n  enabled: false\n")
    return path


def test_plan_shows_the_estimate_and_a_build_refuses_before_starting(tmp_path: Path, checkpoint: Path) -> None:
    m, cache = manifest(tmp_path, checkpoint), tmp_path / "cache"
    weights = (checkpoint / "model.safetensors").stat().st_size
    plan = json.loads(run_qbuild("plan", str(m), "--json", cache=cache, check=True).stdout)
    (note,) = [n for n in plan["notes"] if n.startswith("export + compile: estimated peak memory")]
    assert f"2.0 x {weights / 2**30:.2f} GB of weights" in note and "available" in note

    refused = run_qbuild(str(m), cache=cache, env={"QBUILD_MEMORY_LIMIT": "64M"})
    assert refused.returncode == 3 and "the export and compile need more memory than this machine has" in refused.stderr
    assert "available 0.06 GB" in refused.stderr and "--ignore-memory" in refused.stderr
    assert not (cache / "objects").exists()  # refused before any stage ran

    forced = run_qbuild(str(m), "--ignore-memory", "--json", cache=cache, env={"QBUILD_MEMORY_LIMIT": "64M"},
                        check=True)
    assert {s["state"] for s in json.loads(forced.stdout.splitlines()[-1])["stages"]} == {"built"}


def test_records_hold_peak_rss_and_the_export_its_weight_bytes(tmp_path: Path, checkpoint: Path) -> None:
    m, cache = manifest(tmp_path, checkpoint), tmp_path / "cache"
    run_qbuild(str(m), cache=cache, check=True)
    records = {r.parent.parent.name: json.loads(r.read_text()) for r in (cache / "objects").glob("*/*/record.json")}
    for stage in ("load", "export", "compile"):
        rec = records[stage]
        assert rec["peak_rss_bytes"] >= rec["start_rss_bytes"] > 10_000_000, stage
    assert records["export"]["weight_bytes"] == (checkpoint / "model.safetensors").stat().st_size
    # the export ran in a process that had imported torch: its peak is above that baseline
    assert records["export"]["peak_rss_bytes"] > 100_000_000


def test_the_ratio_is_measured_from_earlier_exports_of_real_size(tmp_path: Path) -> None:
    from qbuild.plan.memory import DEFAULT_RATIO, MIN_SAMPLE_BYTES, measured_ratio, parse_size

    def record(name: str, weights: int, start: int, peak: int) -> None:
        d = tmp_path / "objects" / "export" / name
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps({"weight_bytes": weights, "start_rss_bytes": start,
                                                   "peak_rss_bytes": peak}))

    assert measured_ratio(tmp_path) == (DEFAULT_RATIO, 0)
    record("tiny", 1_000_000, 400_000_000, 500_000_000)  # the exporter's overhead, not a ratio: ignored
    assert measured_ratio(tmp_path) == (DEFAULT_RATIO, 0)
    big = MIN_SAMPLE_BYTES * 10
    record("a", big, 400_000_000, 400_000_000 + 3 * big)
    record("b", big, 400_000_000, 400_000_000 + 4 * big)
    record("c", big, 400_000_000, 400_000_000 + 9 * big)
    assert measured_ratio(tmp_path) == (4.0, 3)  # the median

    def compile_record(name: str, export: str, start: int, peak: int) -> None:
        d = tmp_path / "objects" / "compile" / name
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps({"identity": {"upstream": {"export": export}},
                                                   "start_rss_bytes": start, "peak_rss_bytes": peak}))

    compile_record("ca", "a", 400_000_000, 400_000_000 + 2 * big)  # below its export's 3x: the export's stands
    assert measured_ratio(tmp_path) == (4.0, 3)
    compile_record("ca2", "a", 400_000_000, 400_000_000 + 5 * big)  # a compile of "a" above it: a's ratio is 5
    compile_record("cx", "unknown-export", 400_000_000, 400_000_000 + 50 * big)  # weights unknown: ignored
    assert measured_ratio(tmp_path) == (5.0, 3)
    assert parse_size("1.5GiB", "x") == int(1.5 * 2**30) and parse_size("500M", "x") == 500 * 2**20

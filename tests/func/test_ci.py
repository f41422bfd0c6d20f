"""CI artifact builds: several manifests in one run, bundles with provenance, cache modes (real builds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import ROOT, TINY, run_qbuild

TOML = ROOT / "manifests" / "tiny-llama.toml"
BERT = ROOT / "manifests" / "tiny-bert.yaml"
KV = ROOT / "manifests" / "tiny-llama-kv.yaml"
QUICK = ["verify.enabled=false", "compile.onnxruntime.session=dynamic"]


def records(cache: Path) -> list[Path]:
    return sorted((cache / "objects").glob("*/*/record.json"))


def last_json(text: str) -> object:
    return json.loads(text.strip().splitlines()[-1])


def test_several_manifests_plan_first_build_shared_stages_once_and_report_each(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = run_qbuild(str(TINY), str(TOML), str(BERT), *QUICK, "--json", cache=cache, check=True)
    out = last_json(proc.stdout)
    assert [o["name"] for o in out] == ["tiny-llama", "tiny-llama", "tiny-bert"]
    assert [o["manifest"] for o in out] == [str(TINY), str(TOML), str(BERT)]
    # the TOML manifest is the YAML one in another format: every stage of the second is the first's
    assert [s["key"] for s in out[0]["stages"]] == [s["key"] for s in out[1]["stages"]]
    assert {s["state"] for s in out[1]["stages"]} == {"cached"}
    keys = {s["key"] for o in out for s in o["stages"]}
    assert len(records(cache)) == len(keys)  # each distinct stage built exactly once
    # a directory and a glob name the same manifests
    listing = run_qbuild("plan", str(ROOT / "manifests" / "tiny-llama.*"), *QUICK, "--json", cache=cache, check=True)
    assert [p["manifest"] for p in last_json(listing.stdout)] == [str(ROOT / "manifests" / "tiny-llama.toml"),
                                                                  str(ROOT / "manifests" / "tiny-llama.yaml")]
    assert all(s["state"] == "cached" for p in last_json(listing.stdout) for s in p["stages"])


def test_a_bad_manifest_among_several_fails_before_anything_is_built(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "manifests" / "tiny-llama.yaml").read_text() + "\nexport:\n  opset: 3\n")
    proc = run_qbuild(str(TINY), str(bad), *QUICK, cache=cache)
    assert proc.returncode == 2 and "export.opset" in proc.stderr and "Traceback" not in proc.stderr
    assert records(cache) == []
    missing = run_qbuild(str(TINY), str(tmp_path / "nope*.yaml"), cache=cache)
    assert missing.returncode == 2 and "no manifest matches" in missing.stderr


def test_bundles_carry_provenance_and_verify_bundle_rereads_them(tmp_path: Path) -> None:
    cache, dist = tmp_path / "cache", tmp_path / "dist"
    proc = run_qbuild(str(KV), str(BERT), "verify.max_new_tokens=4", "--out", str(dist), "--json", cache=cache,
                      check=True)
    out = {o["name"]: o for o in last_json(proc.stdout)}
    bundle = dist / "tiny-llama-kv"
    assert out["tiny-llama-kv"]["bundle"] == str(bundle)
    prov = json.loads((bundle / "provenance.json").read_text())
    assert [s["key"] for s in prov["stages"]] == [s["key"] for s in out["tiny-llama-kv"]["stages"]]
    assert all(s["peak_rss_bytes"] > 10_000_000 and s["seconds"] >= 0 for s in prov["stages"])
    assert prov["stages"][0]["identity"]["sources"] or prov["stages"][0]["identity"]["params"]
    assert prov["manifest"]["resolved"]["model"]["config"]["num_hidden_layers"] >= 1
    assert prov["compiler"]["backend"] == "onnxruntime" and prov["compiler"]["command"]
    assert prov["compiler"]["tools"].get("onnxruntime")
    assert prov["host"]["cpu_count"] >= 1 and prov["host"]["memory_bytes"] > 0 and prov["qbuild"]
    assert {"compiled/model.onnx", "compiled/session.json", "verify.json", "tokenizer/tokenizer.json"} <= \
        set(prov["files"])
    compiled = Path(out["tiny-llama-kv"]["artifacts"]["compiled"])
    # copies, not hard links: onnx refuses external data with several links ("potential hardlink attack"), which
    # made both the bundle and the cache entry unloadable with onnx.load
    import onnx

    data = [f for f in (bundle / "compiled").iterdir() if f.suffix == ".data"]
    assert data and all(f.stat().st_nlink == 1 for f in data)
    assert all((compiled / f.name).stat().st_nlink == 1 for f in data)
    for model in (bundle / "compiled" / "model.onnx", compiled / "model.onnx"):
        assert any(t.raw_data for t in onnx.load(str(model)).graph.initializer)  # external data read back
    ok = run_qbuild("verify-bundle", str(dist), "--json", check=True)
    assert {Path(b["bundle"]).name for b in last_json(ok.stdout)["bundles"]} == {"tiny-llama-kv", "tiny-bert"}

    shutil.copytree(bundle, tmp_path / "copy")  # what a deploy step downloads: copies, not links
    target = tmp_path / "copy" / "compiled" / "model.onnx"
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x10
    target.write_bytes(bytes(data))
    (tmp_path / "copy" / "stray.txt").write_text("x")
    bad = run_qbuild("verify-bundle", str(tmp_path / "copy"))
    assert bad.returncode == 12
    assert "compiled/model.onnx: sha256 differs" in bad.stderr and "stray.txt: not in provenance" in bad.stderr
    edited = json.loads((bundle / "provenance.json").read_text())
    edited["stages"][0]["key"] = "0" * 64
    (tmp_path / "copy" / "provenance.json").write_text(json.dumps(edited))
    assert "seal mismatch" in run_qbuild("verify-bundle", str(tmp_path / "copy")).stderr


def test_readonly_succeeds_warm_and_fails_cold_naming_the_stage(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = run_qbuild(str(TINY), *QUICK, "--cache", "readonly", cache=cache)
    assert cold.returncode == 10 and "stage load is not in the cache" in cold.stderr
    assert not (cache / "objects").exists()  # readonly wrote nothing
    run_qbuild(str(TINY), *QUICK, cache=cache, check=True)
    warm = run_qbuild(str(TINY), *QUICK, "--cache", "readonly", "--json", cache=cache, check=True)
    assert {s["state"] for s in last_json(warm.stdout)["stages"]} == {"cached"}
    changed = run_qbuild(str(TINY), *QUICK, "compile.onnxruntime.threads=1", "--cache", "readonly", cache=cache)
    assert changed.returncode == 10
    assert "stage compile is not in the cache (compile.onnxruntime.threads: 2 -> 1)" in changed.stderr


def test_redo_rebuilds_compares_and_names_what_differs(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_qbuild(str(TINY), *QUICK, cache=cache, check=True)
    before = {p: p.read_bytes() for p in records(cache)}
    same = run_qbuild(str(TINY), *QUICK, "--cache", "redo", "--json", cache=cache, check=True)
    stages = last_json(same.stdout)["stages"]
    assert [s["state"] for s in stages] == ["redone"] * 3 and all(s["reproducible"] for s in stages)
    assert {p: p.read_bytes() for p in records(cache)} == before  # the cached entries were kept
    # an entry published with other bytes than its inputs produce today (as an earlier, non-deterministic
    # build of the same key, or one pulled from elsewhere, would have): redo names the stage and the file
    from qbuild.store import Store

    store = Store(cache)
    (entry_dir,) = (cache / "objects" / "compile").iterdir()
    entry, why = store.lookup("compile", entry_dir.name)
    assert entry is not None, why
    staging = store.new_staging(entry.key)
    for f in entry.out.iterdir():
        shutil.copy(f, staging / "out" / f.name)
    (staging / "out" / "session.json").write_text(
        (entry.out / "session.json").read_text().replace('"mode": "dynamic"', '"mode": "fixed"'))
    store.publish("compile", entry.key, staging, {k: v for k, v in entry.record.items()
                                                  if k not in ("format", "stage", "key", "files", "seal")})
    store.close()
    bad = run_qbuild(str(TINY), *QUICK, "--cache", "redo", cache=cache)
    assert bad.returncode == 11, bad.stderr
    assert "rebuilt outputs differ from the cached ones: tiny-llama: compile (session.json)" in bad.stderr


def test_cache_off_uses_a_throwaway_cache_and_bundles_survive_it(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    env = {"TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    proc = run_qbuild(str(TINY), *QUICK, "--cache", "off", "--out", str(dist), "--json",
                      cache=tmp_path / "never", env=env, check=True)
    assert {s["state"] for s in last_json(proc.stdout)["stages"]} == {"built"}
    assert not (tmp_path / "never").exists() and list((tmp_path / "tmp").glob("qbuild-cache-off-*")) == []
    run_qbuild("verify-bundle", str(dist / "tiny-llama"), check=True)


def test_options_of_a_build_are_refused_elsewhere(tmp_path: Path) -> None:
    proc = run_qbuild("plan", str(TINY), "--out", str(tmp_path), cache=tmp_path / "c")
    assert proc.returncode == 2 and "--out is an option of qbuild build, not of qbuild plan" in proc.stderr
    proc = run_qbuild("run", str(TINY), str(BERT), "--prompt", "hi", cache=tmp_path / "c")
    assert proc.returncode == 2 and "takes one manifest" in proc.stderr
    proc = run_qbuild("verify-bundle", str(tmp_path))
    assert proc.returncode == 12 and "no provenance.json" in proc.stderr


def test_cache_verify_mode_rereads_every_used_file_and_rebuilds_a_damaged_one(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_qbuild(str(TINY), *QUICK, cache=cache, check=True)
    sound = run_qbuild(str(TINY), *QUICK, "--cache", "verify", "--json", cache=cache, check=True)
    assert {s["state"] for s in last_json(sound.stdout)["stages"]} == {"cached"}
    data = next((cache / "objects" / "export").glob("*/out/model.onnx"))
    data.parent.chmod(0o755)
    data.chmod(0o644)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    data.write_bytes(bytes(raw))
    redo = run_qbuild(str(TINY), *QUICK, "--cache", "verify", "--json", cache=cache, check=True)
    states = {s["name"]: s["state"] for s in last_json(redo.stdout)["stages"]}
    assert states == {"load": "cached", "export": "built", "compile": "cached"}

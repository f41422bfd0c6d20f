"""Issue 13: image-text-to-text (Gemma 3) as two programs, end to end on CPU with the tiny twin.

One build of manifests/tiny-gemma3-vlm.yaml is shared by the module (its verify stage already compares a
batch of two images and a text-only prompt with transformers over 32 tokens); the tests run the CLI on it
with the shipped PNG fixtures, plan changes against it, and compile both branches with the qaic stand-in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from qbuild.api import build, plan
from qbuild.errors import RunError
from tests.conftest import ROOT, json_lines, run_qbuild

MANIFEST = ROOT / "manifests" / "tiny-gemma3-vlm.yaml"
IMAGES = [ROOT / "tests" / "fixtures" / "images" / n for n in ("gradient.png", "checker.png")]
FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-sdk"
PROMPT = "Describe the image"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One build per test session: xdist workers share the cache (the store's per-key locks make one of
    them build each stage while the other waits and reuses it)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "vlm-cache"
    result = build(MANIFEST, cache_dir=cache)
    return {"cache": cache, "result": result}


@pytest.fixture(scope="module")
def hf_tokens(built: dict[str, Any]) -> dict[str | None, list[int]]:
    """transformers' greedy tokens (32 new) for each fixture image with PROMPT, and for PROMPT alone."""
    from qbuild.vlm.model import load, load_processor
    from qbuild.vlm.runtime import hf_greedy, prepare

    model_dir = Path(built["result"].model_dir)
    vlm, processor = load(model_dir, "float32"), load_processor(model_dir)
    images: list[Any] = [*(str(p) for p in IMAGES), None]
    rows = prepare(processor, images, [PROMPT] * len(images))
    return {image: hf_greedy(vlm, row, 32) for image, row in zip(images, rows, strict=True)}


def test_the_build_has_two_branches_and_verify_compared_images_with_transformers(built: dict[str, Any]) -> None:
    result = built["result"]
    assert [s["name"] for s in result.stages] == ["load", "export_vision", "compile_vision", "export", "compile",
                                                  "verify"]
    report = json.loads(Path(result.artifacts["report"]).read_text())
    assert report["images"] == [True, True, False] and report["max_new_tokens"] == 32
    assert all(len(t) == 32 for t in report["tokens"])
    assert report["tokens"][0] != report["tokens"][1], "two images of different content gave the same tokens"
    spec = json.loads((Path(result.artifacts["vision_compiled"]) / "session.json").read_text())["specializations"]
    assert spec == [{"name": "Vision", "symbols": {"batch_size": 1, "img_size": 32}}]


def test_run_with_an_image_streams_its_text(built: dict[str, Any]) -> None:
    proc = run_qbuild("run", str(MANIFEST), "--image", str(IMAGES[0]), "--prompt", PROMPT, "--max-new-tokens", "8",
                      cache=built["cache"], check=True)
    assert proc.stdout.startswith(PROMPT) and len(proc.stdout.strip()) > len(PROMPT)


def test_a_batch_of_two_images_and_a_text_only_prompt_match_transformers(
        built: dict[str, Any], hf_tokens: dict[str | None, list[int]]) -> None:
    out = run_qbuild("run", str(MANIFEST), "--image", str(IMAGES[0]), "--prompt", PROMPT, "--image", str(IMAGES[1]),
                     "--prompt", PROMPT, "--image", "", "--prompt", PROMPT, "--json", cache=built["cache"], check=True)
    results = json.loads(out.stdout)["results"]
    assert [r["tokens"] for r in results] == [hf_tokens[str(IMAGES[0])], hf_tokens[str(IMAGES[1])], hf_tokens[None]]
    assert hf_tokens[str(IMAGES[0])] != hf_tokens[str(IMAGES[1])] != hf_tokens[None]


def test_a_decoder_bucket_rebuilds_only_the_decoder_branch(built: dict[str, Any]) -> None:
    proc = run_qbuild(str(MANIFEST), "seq.lengths=[32,96]", "--json", cache=built["cache"], check=True)
    summary = json_lines(proc.stdout)[-1]
    states = {s["name"]: s["state"] for s in summary["stages"]}
    assert states == {"load": "cached", "export_vision": "cached", "compile_vision": "cached", "export": "cached",
                      "compile": "built", "verify": "built"}


def test_a_vision_setting_replans_only_the_vision_branch_and_plan_shows_both(built: dict[str, Any]) -> None:
    p = plan(MANIFEST, ["vlm.vision_batch_size=2"], cache_dir=built["cache"])
    assert {s.name: s.state for s in p.stages} == {"load": "cached", "export_vision": "cached",
                                                   "compile_vision": "build", "export": "cached",
                                                   "compile": "cached", "verify": "build"}
    assert p.stage("compile_vision").reasons == ["vlm.vision_batch_size: 1 -> 2"]
    assert p.stage("verify").stage.upstream == ("compile", "compile_vision")


def test_both_branches_compile_with_the_qaic_stand_in(built: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = tmp_path / "sdk"
    shutil.copytree(FAKE_SDK, sdk)
    monkeypatch.setenv("QAIC_SDK_DIR", str(sdk))
    monkeypatch.setenv("FAKE_QAIC_LOG", str(tmp_path / "calls.jsonl"))
    r = build(MANIFEST, ["compile.backend=qaic"], cache_dir=built["cache"])
    states = {s["name"]: s["state"] for s in r.stages}
    assert states["export_vision"] == "cached" and "verify" not in states  # the vision graph is backend-neutral
    vision, lang = Path(r.artifacts["vision_compiled"]), Path(r.artifacts["compiled"])
    specs = [json.loads((d / "specializations.json").read_text())["specializations"] for d in (vision, lang)]
    assert [s["name"] for s in specs[0]] == ["Vision"]
    assert [s["name"] for s in specs[1]] == ["Prefill_0", "Prefill_1", "Decode"]
    assert all(s["symbols"]["vision_size"] == "4" for s in specs[1])
    assert "-retained-state" in (lang / "command.txt").read_text()
    assert "-retained-state" not in (vision / "command.txt").read_text()
    assert "past_key.0_RetainedState" in (lang / "custom_io.yaml").read_text()
    assert (lang / "custom_io.yaml").read_text().startswith(  # the image I/O at the mapped model dtype (1.6)
        " - IOName: vision_embeds\n   Precision: float16\n\n - IOName: vision_embeds_RetainedState\n")
    assert (vision / "custom_io.yaml").read_text() == (" - IOName: pixel_values\n   Precision: float16\n\n"
                                                       " - IOName: vision_embeds\n   Precision: float16\n\n")
    assert "-custom-IO-list-file=<out>/custom_io.yaml" in (vision / "command.txt").read_text()
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2


def test_unpaired_images_are_a_clear_error(built: dict[str, Any]) -> None:
    from qbuild.api import run

    with pytest.raises(RunError, match="2 --image for 1 --prompt"):
        run(MANIFEST, prompts=[PROMPT], images=[str(IMAGES[0]), str(IMAGES[1])], cache_dir=built["cache"])

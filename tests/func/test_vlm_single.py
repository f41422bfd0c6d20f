"""Issue 13, ``vlm.mode: single``: Gemma 3 and Llama 4 as one program (vision encoder inside the graph).

Each family's tiny twin is built once in single mode, in the cache its dual-mode test module uses (the load
stage is shared: its key does not read vlm.mode); verify runs a few tokens, the tests compare 32 new tokens
of two fixture images and a text-only row in one batch with transformers, run the CLI, plan, and compile a
single-mode build with the qaic stand-in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from qbuild.api import build, plan, run
from tests.conftest import ROOT

MANIFESTS = {f: ROOT / "manifests" / f"tiny-{f}-vlm.yaml" for f in ("gemma3", "llama4")}
CACHES = {"gemma3": "vlm-cache", "llama4": "vlm-llama4-cache"}  # the dual modules' caches: the load is shared
IMAGES = [str(ROOT / "tests" / "fixtures" / "images" / n) for n in ("gradient.png", "checker.png")]
FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-sdk"
PROMPT = "Describe the image"
SINGLE = ["vlm.mode=single", "verify.max_new_tokens=4"]  # the tests compare 32 tokens themselves


@pytest.fixture(scope="module", params=["gemma3", "llama4"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The single-mode build of one family, and transformers' 32 greedy tokens for each fixture image with
    PROMPT and for PROMPT alone."""
    from qbuild.vlm.model import load, load_processor
    from qbuild.vlm.runtime import hf_greedy, prepare

    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / CACHES[request.param]
    manifest = MANIFESTS[request.param]
    result = build(manifest, SINGLE, cache_dir=cache)
    model_dir = Path(result.model_dir)
    vlm, processor = load(model_dir, "float32"), load_processor(model_dir)
    images: list[str | None] = [*IMAGES, None]
    rows = prepare(processor, images, [PROMPT] * len(images))
    return {"family": request.param, "manifest": manifest, "cache": cache, "result": result,
            "expected": [hf_greedy(vlm, row, 32) for row in rows]}


def test_one_program_whose_verify_compared_images_with_transformers(built: dict[str, Any]) -> None:
    result = built["result"]
    assert [s["name"] for s in result.stages] == ["load", "export", "compile", "verify"]
    assert "vision_compiled" not in result.artifacts
    export = json.loads((Path(result.artifacts["onnx"]).parent / "vlm.json").read_text())
    assert export["mode"] == "single"
    import onnx

    graph = onnx.load(result.artifacts["onnx"], load_external_data=False).graph
    names = [v.name for v in graph.input], [v.name for v in graph.output]
    assert names[0][:5] == ["pixel_values", "input_ids", "position_ids", "image_idx", "past_key.0"]
    assert names[1][:4] == ["logits", "pixel_values_RetainedState", "image_idx_output", "past_key.0_RetainedState"]
    report = json.loads(Path(result.artifacts["report"]).read_text())
    assert report["images"] == [True, True, False] and report["max_new_tokens"] == 4


def test_two_images_and_a_text_only_row_in_one_batch_match_transformers(built: dict[str, Any]) -> None:
    expected = built["expected"]
    assert expected[0] != expected[1] != expected[2]
    r = run(built["manifest"], SINGLE, prompts=[PROMPT] * 3, images=[*IMAGES, None], cache_dir=built["cache"])
    assert r.tokens == expected
    assert r.stats["images"] == [True, True, False]


def test_a_batch_of_two_with_a_text_only_row_first_matches_transformers(built: dict[str, Any]) -> None:
    """The text-only row comes first: the image's offset in the program's table does not depend on the row."""
    r = run(built["manifest"], SINGLE, prompts=[PROMPT] * 2, images=[None, IMAGES[1]], cache_dir=built["cache"])
    assert r.tokens == [built["expected"][2], built["expected"][1]]


def test_a_prompt_without_an_image_works_alone(built: dict[str, Any]) -> None:
    r = run(built["manifest"], SINGLE, prompts=[PROMPT], max_new_tokens=8, cache_dir=built["cache"])
    assert r.tokens == [built["expected"][2][:8]]


def test_plan_shows_one_branch_and_the_mode_never_reaches_load(built: dict[str, Any]) -> None:
    single = plan(built["manifest"], SINGLE, cache_dir=built["cache"])
    dual = plan(built["manifest"], ["verify.max_new_tokens=4"], cache_dir=built["cache"])
    assert [s.name for s in single.stages] == ["load", "export", "compile", "verify"]
    assert all(s.state == "cached" for s in single.stages)
    assert "export_vision" in [s.name for s in dual.stages]
    assert single.stage("load").key == dual.stage("load").key
    assert single.stage("export").key != dual.stage("export").key
    assert single.stage("verify").stage.upstream == ("compile",)


def test_a_run_with_an_image_streams_its_text(built: dict[str, Any]) -> None:
    """What `qbuild run MANIFEST vlm.mode=single --image PATH --prompt TEXT` prints (the CLI passes on_text; its
    own path is tested in dual mode, tests/func/test_vlm.py: in-process here, a subprocess costs 8 s)."""
    streamed: list[str] = []
    r = run(built["manifest"], SINGLE, prompts=[PROMPT], images=[IMAGES[0]], max_new_tokens=8,
            cache_dir=built["cache"], on_text=lambda row, text: streamed.append(text))
    assert r.tokens == [built["expected"][0][:8]] and len(streamed) > 1 and "".join(streamed) == r.texts[0]


def test_a_single_mode_build_compiles_with_the_qaic_stand_in(built: dict[str, Any], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = tmp_path / "sdk"
    shutil.copytree(FAKE_SDK, sdk)
    monkeypatch.setenv("QAIC_SDK_DIR", str(sdk))
    r = build(built["manifest"], [*SINGLE, "compile.backend=qaic"], cache_dir=built["cache"])
    assert [s["name"] for s in r.stages] == ["load", "export", "compile"]  # the stand-in's QPC cannot run here
    out = Path(r.artifacts["compiled"])
    specs = json.loads((out / "specializations.json").read_text())["specializations"]
    assert [s["name"] for s in specs] == ["Prefill_0", "Prefill_1", "Decode"]
    img = {"img_size": "32"}
    if built["family"] == "gemma3":
        img |= {"vision_size": "4", "vision_batch_size": "1"}
    else:  # QEfficient's single variant: max_num_tiles, no vision_size
        img |= {"max_num_tiles": "5"}
    assert [s["symbols"] for s in specs] == [{"batch_size": "1", "ctx_len": "128", "seq_len": n, **img}
                                             for n in ("32", "64", "1")]
    assert (out / "custom_io.yaml").read_text().startswith(  # the image I/O at the mapped model dtype (1.6)
        " - IOName: pixel_values\n   Precision: float16\n\n - IOName: pixel_values_RetainedState\n   Precision: "
        "float16\n\n - IOName: past_key.0\n   Precision: float16\n\n - IOName: past_key.0_RetainedState\n")
    command = (out / "command.txt").read_text()
    assert "-retained-state" in command and "-custom-IO-list-file=<out>/custom_io.yaml" in command

"""Issue 13: Llama 4 with images as two programs, end to end on CPU with the tiny twin.

One build of manifests/tiny-llama4-vlm.yaml is shared by the module (its verify stage already compares two
synthetic images and a text-only prompt with transformers over 32 tokens); the tests run `qbuild run` on it
with the shipped PNG fixtures against transformers' ``Llama4ForConditionalGeneration.generate`` fed the same
processor output, check qbuild's tiler against transformers' algorithm, and compile both branches with the
qaic stand-in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from qbuild.api import build, run
from qbuild.errors import ManifestError
from tests.conftest import ROOT, run_qbuild

MANIFEST = ROOT / "manifests" / "tiny-llama4-vlm.yaml"
IMAGES = [ROOT / "tests" / "fixtures" / "images" / n for n in ("gradient.png", "checker.png")]
FAKE_SDK = ROOT / "tests" / "fixtures" / "fake-sdk"
PROMPT = "Describe the image"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One build per test session (xdist workers share the cache; the store's locks make one build it)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "vlm-llama4-cache"
    return {"cache": cache, "result": build(MANIFEST, cache_dir=cache)}


@pytest.fixture(scope="module")
def processed(built: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """The saved processor, and each fixture image with PROMPT and PROMPT alone through it."""
    from qbuild.vlm.model import load_processor
    from qbuild.vlm.runtime import prepare

    processor = load_processor(Path(built["result"].model_dir))
    images: list[Any] = [*(str(p) for p in IMAGES), None]
    return processor, prepare(processor, images, [PROMPT] * len(images))


def test_the_build_has_two_branches_and_verify_compared_images_with_transformers(built: dict[str, Any]) -> None:
    result = built["result"]
    assert [s["name"] for s in result.stages] == ["load", "export_vision", "compile_vision", "export", "compile",
                                                  "verify"]
    report = json.loads(Path(result.artifacts["report"]).read_text())
    assert report["images"] == [True, True, False] and all(len(t) == 32 for t in report["tokens"])
    assert report["tokens"][0] != report["tokens"][1], "two images of different content gave the same tokens"
    session = json.loads((Path(result.artifacts["vision_compiled"]) / "session.json").read_text())
    assert session["specializations"] == [{"name": "Vision", "symbols": {"batch_size": 1, "max_num_tiles": 5,
                                                                          "img_size": 32}}]


@pytest.fixture(scope="module")
def expected(built: dict[str, Any], processed: tuple[Any, list[dict[str, Any]]]) -> list[list[int]]:
    """transformers' ``Llama4ForConditionalGeneration.generate`` (32 greedy tokens) on each processed row."""
    from qbuild.vlm.model import load
    from qbuild.vlm.runtime import hf_greedy

    vlm = load(Path(built["result"].model_dir), "float32")
    return [hf_greedy(vlm, row, 32) for row in processed[1]]


def test_a_batch_of_two_images_and_a_text_only_prompt_match_transformers(built: dict[str, Any],
                                                                          expected: list[list[int]]) -> None:
    assert expected[0] != expected[1] != expected[2]
    out = run_qbuild("run", str(MANIFEST), "--image", str(IMAGES[0]), "--prompt", PROMPT, "--image", str(IMAGES[1]),
                     "--prompt", PROMPT, "--image", "", "--prompt", PROMPT, "--json", cache=built["cache"], check=True)
    results = json.loads(out.stdout.splitlines()[0])["results"]
    assert [r["tokens"] for r in results] == expected


def test_run_with_one_image_streams_its_text(built: dict[str, Any]) -> None:
    streamed: list[str] = []
    r = run(MANIFEST, prompts=[PROMPT], images=[str(IMAGES[0])], max_new_tokens=8, cache_dir=built["cache"],
            on_text=lambda row, text: streamed.append(text))
    assert len(r.tokens[0]) == 8 and "".join(streamed) == r.texts[0]
    assert r.stats["images"] == [True] and r.stats["prompt_tokens"][0] > 20  # the 20 image tokens are in


def test_an_image_across_prefill_chunks_chains_image_idx(built: dict[str, Any], expected: list[list[int]]) -> None:
    """16-token chunks: the image's 20 patch tokens (positions 8..32) span three chunks, each taking its rows of
    vision_embeds from the image_idx the previous chunk returned."""
    r = run(MANIFEST, ["seq.lengths=[16]", "verify.enabled=false"], prompts=[PROMPT], images=[str(IMAGES[0])],
            cache_dir=built["cache"])
    assert r.stats["prefill_chunks"] >= 3 and r.tokens[0] == expected[0]


def test_the_processor_tiles_and_expands_as_llama4(processed: tuple[Any, list[dict[str, Any]]]) -> None:
    """A 48x40 image with 32 px tiles: the 64x64 canvas (2x2 tiles) + the global tile; 4 patch tokens a tile."""
    import numpy as np

    processor, rows = processed
    pixels = rows[0]["pixel_values"]
    assert pixels.shape == (5, 3, 32, 32)
    canvas = np.zeros((3, 64, 64), np.float32)
    canvas[:, :32, :32], canvas[:, :32, 32:], canvas[:, 32:, :32], canvas[:, 32:, 32:] = pixels[:4]
    assert (canvas[:, 48:, :] == -1).all() and (canvas[:, :, 58:] == -1).all()  # zero padding, normalised
    assert (canvas[:, :48, :58] > -1).any()
    import torch

    assert torch.equal(torch.from_numpy(pixels).bfloat16().float(), torch.from_numpy(pixels))  # bf16 values
    text = processor.tokenizer.decode(rows[0]["input_ids"])
    tile = "<|patch|>" * 4
    grid = f"{tile}<|tile_x_separator|>{tile}<|tile_y_separator|>" * 2
    assert f"<|image_start|>{grid}<|image|>{tile}<|image_end|>{PROMPT}<|eot|>" in text
    assert rows[2]["pixel_values"] is None and "<|patch|>" not in processor.tokenizer.decode(rows[2]["input_ids"])


def transformers_functions(*names: str) -> dict[str, Any]:
    """Functions of transformers' installed image_processing_llama4.py, run without the torchvision import its
    module makes (they use math, torch and defaultdict only)."""
    import ast
    import math
    from collections import defaultdict

    import torch
    import transformers

    path = Path(transformers.__file__).parent / "models" / "llama4" / "image_processing_llama4.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    picked = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    for node in picked:
        node.decorator_list = []  # lru_cache: the SizeDict argument below is a plain object
    namespace: dict[str, Any] = {"math": math, "torch": torch, "defaultdict": defaultdict, "SizeDict": Any}
    exec(compile(ast.Module(picked, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return {n: namespace[n] for n in names}


def test_the_tiler_equals_transformers_canvas_choice() -> None:
    """qbuild's tiler picks the canvas and the resized size as transformers' own functions do, over many image
    sizes, tile counts and both canvas policies."""
    from types import SimpleNamespace

    import torch

    from qbuild.vlm.tiler import best_canvas, fit_without_distortion, supported_canvases

    hf = transformers_functions("get_factors", "get_max_res_without_distortion", "find_supported_resolutions",
                                "get_best_fit")
    for patches, size in [(4, 32), (16, 336), (6, 224)]:
        canvases = hf["find_supported_resolutions"](patches, SimpleNamespace(height=size, width=size))
        assert supported_canvases(patches, size) == canvases
        for h in (1, 17, 40, 200, 335, 336, 337, 700, 1500):
            for w in (1, 23, 48, 300, 336, 999, 2048):
                for to_max in (False, True):
                    want = tuple(int(x) for x in hf["get_best_fit"]((h, w), torch.tensor(canvases), to_max))
                    assert best_canvas(h, w, canvases, to_max) == want, (patches, size, h, w, to_max)
                    target = want if to_max else (min(max(h, size), want[0]), min(max(w, size), want[1]))
                    assert fit_without_distortion(h, w, target) == tuple(
                        max(x, 1) for x in hf["get_max_res_without_distortion"]((h, w), target))


def test_both_branches_compile_with_the_qaic_stand_in(built: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = tmp_path / "sdk"
    shutil.copytree(FAKE_SDK, sdk)
    monkeypatch.setenv("QAIC_SDK_DIR", str(sdk))
    r = build(MANIFEST, ["compile.backend=qaic"], cache_dir=built["cache"])
    vision, lang = Path(r.artifacts["vision_compiled"]), Path(r.artifacts["compiled"])
    specs = [json.loads((d / "specializations.json").read_text())["specializations"] for d in (vision, lang)]
    assert specs[0] == [{"name": "Vision", "symbols": {"batch_size": "1", "img_size": "32", "max_num_tiles": "5"}}]
    assert [s["name"] for s in specs[1]] == ["Prefill_0", "Prefill_1", "Decode"]
    assert all(s["symbols"]["vision_size"] == "20" for s in specs[1])
    assert (vision / "custom_io.yaml").read_text() == (" - IOName: pixel_values\n   Precision: float16\n\n"
                                                       " - IOName: vision_embeds\n   Precision: float16\n\n")
    assert (lang / "custom_io.yaml").read_text().startswith(
        " - IOName: vision_embeds\n   Precision: float16\n\n - IOName: vision_embeds_RetainedState\n   Precision: "
        "float16\n\n - IOName: past_key.0\n   Precision: float16\n\n - IOName: past_key.0_RetainedState\n")
    for d in (vision, lang):
        assert "-custom-IO-list-file=<out>/custom_io.yaml" in (d / "command.txt").read_text()


def test_until_stops_after_a_step_of_both_branches_or_after_one_branch(built: dict[str, Any], tmp_path: Path) -> None:
    def names(until: str) -> list[str]:
        return [s["name"] for s in build(MANIFEST, until=until, cache_dir=built["cache"]).stages]

    assert names("export") == ["load", "export_vision", "export"]
    assert names("compile") == ["load", "export_vision", "compile_vision", "export", "compile"]
    assert names("compile_vision") == ["load", "export_vision", "compile_vision"]
    with pytest.raises(ManifestError, match="this build has no compile_vision stage"):
        build(ROOT / "manifests" / "tiny-llama.yaml", until="compile_vision", cache_dir=tmp_path)
    with pytest.raises(ManifestError, match="unknown stage 'compile_visio'"):
        build(MANIFEST, until="compile_visio", cache_dir=built["cache"])

"""Vision-language models (``model.task: image-text-to-text``): Gemma 3 and Llama 4 built as two programs.

QEfficient's dual-QPC layout (``../shared/reference/qefficient-modes.md`` section 1), as a graph with two
branches: ``export_vision -> compile_vision`` (pixel_values in, ``vision_embeds`` out, already projected to
the text hidden size) and the language ``export -> compile`` (the retained-state KV decoder of
``causal_lm_kv`` taking ``vision_embeds`` and ``image_idx``); verify consumes both.

Plan-time facts (vision size, image size, image token) are read here from the manifest's ``model.config``
or the checkpoint's ``config.json``, without importing torch or transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.errors import PlanError
from qbuild.manifest.schema import Manifest

#: config.model_type of the composite model -> its family module in qbuild.vlm
FAMILIES = {"gemma3": "qbuild.vlm.gemma3", "llama4": "qbuild.vlm.llama4"}
TASK = "image-text-to-text"


@dataclass(frozen=True)
class VisionFacts:
    """What the specialisations of both programs need: per image ``vision_size`` rows of ``vision_embeds``."""

    family: str
    img_size: int
    vision_size: int  # rows of vision_embeds per image (Gemma3: mm_tokens_per_image; Llama4: per tile x tiles)
    max_num_tiles: int = 1


def model_config(m: Manifest) -> dict[str, Any]:
    """The composite config as plain JSON: ``model.config`` (+ architecture) or the checkpoint's config.json."""
    if m.model.init == "random":
        return {"model_type": m.model.architecture, **dict(m.model.config)}
    from qbuild.stages.load import resolve_model

    directory = resolve_model(m)[0].directory
    assert directory is not None
    return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))


def vision_facts(m: Manifest) -> VisionFacts:
    """The family and the vision sizes of a VLM manifest; an unsupported model is a PlanError."""
    config = model_config(m)
    family = config.get("model_type")
    if family not in FAMILIES:
        raise PlanError(f"model.task: {TASK} supports model types {', '.join(sorted(FAMILIES))}, not {family!r}",
                        hint="use a Gemma 3 or Llama 4 checkpoint (or init: random, architecture gemma3 or llama4)")
    vision = config.get("vision_config") or {}
    if family == "gemma3":
        img = int(vision.get("image_size", 896))
        return VisionFacts(family, img, int(config.get("mm_tokens_per_image", 256)))
    img, patch = int(vision.get("image_size", 336)), int(vision.get("patch_size", 14))
    ratio = float(vision.get("pixel_shuffle_ratio", 0.5))
    per_tile = (img // patch) ** 2 // round(1 / ratio ** 2)
    tiles = int(m.vlm.max_num_tiles)
    return VisionFacts(family, img, per_tile * tiles, tiles)

"""Greedy generation with a VLM's two programs (QEfficient's ``kv_offload_generate``, reference 1.8), or its
single program (:class:`VLMSingleRuntime`, ``vlm.mode: single``).

Each image goes through the model's own processor (loaded offline from the export) and the vision program
(``vlm.vision_batch_size`` images per run); its ``vision_embeds`` rows become that batch row's input of the
language program, which then runs the KV loop of :class:`qbuild.runtime.generate.KVRuntime` (prefill chunks,
then decode). ``image_idx`` starts at 0 for a row with an image and is chained through the prefill chunks
(``image_idx_output``); a row without an image, and every decode step, passes -1 (nothing merged).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qbuild.errors import RunError
from qbuild.runtime.generate import Generation, KVRuntime

Row = dict[str, Any]  # {"input_ids": [int], "pixel_values": ndarray | None, "hf": the processor's output}


def prepare(processor: Any, images: Sequence[Any], prompts: Sequence[str]) -> list[Row]:
    """Each (image or None, prompt) through the chat template and the processor; images are PIL images or paths."""
    rows = []
    for image, prompt in zip(images, prompts, strict=True):
        if isinstance(image, (str, Path)):
            image = open_image(Path(image))
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
        if getattr(processor, "chat_template", None):
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        else:
            text = (f"{processor.image_token} " if image is not None else "") + prompt
        hf = processor(images=[image] if image is not None else None, text=[text], return_tensors="pt")
        pixels = hf["pixel_values"].numpy() if image is not None else None
        rows.append({"input_ids": hf["input_ids"][0].tolist(), "pixel_values": pixels, "hf": hf})
    return rows


def open_image(path: Path) -> Any:
    """A PNG/JPEG file as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise RunError(f"--image: cannot read {path} as an image: {exc}", hint="give a PNG or JPEG file") from exc


def hf_greedy(vlm: Any, row: Row, max_new_tokens: int) -> list[int]:
    """transformers' ``generate(do_sample=False)`` on one processed row: its new tokens."""
    import torch

    eos = vlm.generation_config.eos_token_id
    pad = vlm.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    with torch.no_grad():
        out = vlm.generate(**row["hf"], max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return out[0, len(row["input_ids"]):].tolist()


class VLMRuntime(KVRuntime):
    """The language program's KV loop with ``vision_embeds`` and ``image_idx``; the vision program beside it."""

    def __init__(self, lang: Path, vision: Path, export: Path, *, ctx_len: int, buckets: Sequence[int],
                 num_threads: int | None = None) -> None:
        from qbuild.runtime import open_artifact
        from qbuild.vlm.model import load_processor

        super().__init__(Path(lang), ctx_len=ctx_len, buckets=buckets, num_threads=num_threads)
        self.meta = json.loads((Path(export) / "vlm.json").read_text(encoding="utf-8"))
        self.vision = open_artifact(Path(vision), threads=num_threads).sessions()
        self.vision_spec = self.vision.specializations[0]["symbols"]
        self.processor = load_processor(Path(export) / "processor")
        self._prefilling = False

    def encode(self, pixels: list[Any]) -> list[Any]:
        """``vision_embeds [tiles x rows, hidden]`` per image (``pixels``: each ``[tiles, 3, img, img]``; Llama 4's
        tiles are zero-padded to the program's ``max_num_tiles`` per image, Gemma 3 has one)."""
        import numpy as np

        per_run = int(self.vision_spec["batch_size"])
        tiles = int(self.vision_spec.get("max_num_tiles", per_run)) // per_run  # per image
        for i, p in enumerate(pixels):
            if len(p) > tiles:
                raise RunError(f"image {i} has {len(p)} tiles; the vision program takes {tiles} per image",
                               hint=f"build with vlm.max_num_tiles={len(p)} (or more)")
        session = self.vision.session_for(self.vision_spec)
        out = []
        for start in range(0, len(pixels), per_run):
            group = pixels[start:start + per_run]
            padded = [np.concatenate([p, np.zeros((tiles - len(p), *p.shape[1:]), p.dtype)]) for p in group]
            padded += [np.zeros_like(padded[0])] * (per_run - len(group))  # an incomplete last run
            batch = np.concatenate(padded, axis=0).astype(np.float32)  # [per_run * tiles, 3, img, img]
            embeds = session.run(["vision_embeds"], {"pixel_values": batch})[0]  # [per_run * tiles, rows, hidden]
            out += [embeds[i * tiles:i * tiles + len(p)].reshape(-1, embeds.shape[-1]) for i, p in enumerate(group)]
        return out

    def run(self, rows: list[Row], max_new_tokens: int,
            on_token: Callable[[int, int], None] | None = None) -> Generation:
        """Greedy tokens for each processed row (image or not), streamed through ``on_token(row, token)``."""
        import numpy as np

        with_image = [i for i, r in enumerate(rows) if r["pixel_values"] is not None]
        embeds = self.encode([rows[i]["pixel_values"] for i in with_image])
        size, hidden = int(self.meta["vision_size"]), int(self.meta["hidden_size"])
        size = max([size, *(e.shape[0] for e in embeds)])
        self._vision = np.zeros((len(rows), size, hidden), np.float32)
        for i, e in zip(with_image, embeds, strict=True):
            self._vision[i, :e.shape[0]] = e
        self._image_idx = np.array([[0] if r["pixel_values"] is not None else [-1] for r in rows], np.int64)
        prompts = [r["input_ids"] for r in rows]
        self._check_chunks(prompts, with_image)
        return self.generate(prompts, max_new_tokens, self.meta["eos_token_id"], on_token)

    def _check_chunks(self, prompts: list[list[int]], with_image: list[int]) -> None:
        """Gemma 3's image tokens attend to each other: each image's tokens must sit in one prefill chunk."""
        if not self.meta.get("bidirectional_images"):
            return
        chunk = self._chunk_len(max(len(p) for p in prompts))
        image = self.meta["image_token_id"]
        for i in with_image:
            at = [j for j, t in enumerate(prompts[i]) if t == image]
            if at and at[0] // chunk != at[-1] // chunk:
                raise RunError(f"the image tokens of prompt {i} ({at[0]}..{at[-1]}) straddle prefill chunks of "
                               f"{chunk} tokens; they attend to each other, so they must sit in one chunk",
                               hint=f"add a bucket of at least {len(prompts[i])} tokens to seq.lengths")

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[Any, int]:
        self._prefilling = True
        try:
            return super().prefill(prompts)
        finally:
            self._prefilling = False

    def _image_input(self) -> tuple[str, Any]:
        """The image input of this step: the language program's ``vision_embeds``."""
        return "vision_embeds", self._vision

    def _step(self, ids: Any, pos: Any) -> Any:
        """One forward of the language program: as KVRuntime's, plus the image input and image_idx."""
        import numpy as np

        session, io = self._binding(*ids.shape)
        kv_in, kv_out = self._kv
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        image_name, image = self._image_input()
        for name in ("logits", "image_idx_output", f"{image_name}_RetainedState"):
            io.bind_output(name)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("position_ids", pos)
        io.bind_cpu_input(image_name, image)
        image_idx = self._image_idx if self._prefilling else np.full_like(self._image_idx, -1)
        io.bind_cpu_input("image_idx", image_idx)
        for name, cur, nxt in zip(self.kv_inputs, kv_in, kv_out, strict=True):
            io.bind_ortvalue_input(name, cur)
            io.bind_ortvalue_output(f"{name}_RetainedState", nxt)
        session.run_with_iobinding(io)
        self._kv.reverse()
        outputs = io.get_outputs()
        if self._prefilling:
            self._image_idx = outputs[1].numpy().copy()  # the next chunk's running index
        return outputs[0].numpy()


class VLMSingleRuntime(VLMRuntime):
    """The single program's KV loop (``vlm.mode: single``): ``pixel_values`` in place of ``vision_embeds``.

    A prefill chunk takes every image's ``pixel_values`` (Gemma 3: one per image; Llama 4: its tiles),
    concatenated; a row's ``image_idx`` starts at its image's first row in the program's flattened table
    (-1 without an image). A decode step, and a batch without images, passes one zero image (tile): the vision
    tower runs on it and nothing is merged (qbuild.vlm.single: what a decode step costs)."""

    def __init__(self, compiled: Path, export: Path, *, ctx_len: int, buckets: Sequence[int],
                 num_threads: int | None = None) -> None:
        from qbuild.vlm.model import load_processor

        KVRuntime.__init__(self, Path(compiled), ctx_len=ctx_len, buckets=buckets, num_threads=num_threads)
        self.meta = json.loads((Path(export) / "vlm.json").read_text(encoding="utf-8"))
        self.processor = load_processor(Path(export) / "processor")
        self._prefilling = False

    def run(self, rows: list[Row], max_new_tokens: int,
            on_token: Callable[[int, int], None] | None = None) -> Generation:
        """Greedy tokens for each processed row (image or not), streamed through ``on_token(row, token)``."""
        import numpy as np

        m = self.meta
        self._blank = np.zeros((1, m["channels"], m["img_size"], m["img_size"]), np.float32)
        pixels, image_idx, offset = [], [], 0
        for r in rows:
            if r["pixel_values"] is None:
                image_idx.append([-1])
                continue
            pixels.append(r["pixel_values"].astype(np.float32))  # [tiles, 3, img, img]
            image_idx.append([offset])
            offset += len(pixels[-1]) * int(m["tile_rows"])
        self._pixels = np.concatenate(pixels) if pixels else self._blank
        self._image_idx = np.array(image_idx, np.int64)
        prompts = [r["input_ids"] for r in rows]
        self._check_chunks(prompts, [i for i, r in enumerate(rows) if r["pixel_values"] is not None])
        return self.generate(prompts, max_new_tokens, m["eos_token_id"], on_token)

    def _image_input(self) -> tuple[str, Any]:
        return "pixel_values", self._pixels if self._prefilling else self._blank


def pair_images(images: Sequence[str | None], prompts: Sequence[str]) -> list[str | None]:
    """One image (or None) per prompt: none given means text-only prompts; otherwise one per prompt, in order
    (an empty path: that prompt has no image)."""
    if not images:
        return [None] * len(prompts)
    if len(images) != len(prompts):
        raise RunError(f"{len(images)} --image for {len(prompts)} --prompt: give one image per prompt (in order; "
                       "--image '' for a prompt without one), or none")
    for image in images:
        if image and not Path(image).is_file():
            raise RunError(f"--image: {image} does not exist", hint="give the path of a PNG or JPEG file")
    return [image or None for image in images]


def generate_build(artifacts: dict[str, str], ctx_len: int, buckets: Sequence[int], prompts: list[str],
                   images: list[str | None], max_new_tokens: int,
                   on_text: Callable[[int, str], None] | None) -> tuple[list[list[int]], list[str], dict[str, Any]]:
    """Generate for image+prompt pairs with a built VLM (``artifacts``: the build's, by name); streams text
    per row through ``on_text``. Returns (tokens, texts, stats)."""
    export = Path(artifacts["onnx"]).parent
    if "vision_compiled" in artifacts:  # two programs (vlm.mode dual)
        rt: VLMRuntime = VLMRuntime(Path(artifacts["compiled"]), Path(artifacts["vision_compiled"]), export,
                                    ctx_len=ctx_len, buckets=buckets)
    else:  # one program (vlm.mode single)
        rt = VLMSingleRuntime(Path(artifacts["compiled"]), export, ctx_len=ctx_len, buckets=buckets)
    rows = prepare(rt.processor, images, prompts)
    tok = rt.processor.tokenizer
    streamed: list[list[int]] = [[] for _ in prompts]
    shown = [0] * len(prompts)

    def on_token(row: int, token: int) -> None:
        streamed[row].append(token)
        text = tok.decode(streamed[row], skip_special_tokens=True)
        if on_text and len(text) > shown[row] and not text.endswith("\ufffd"):
            on_text(row, text[shown[row]:])
            shown[row] = len(text)

    g = rt.run(rows, max_new_tokens, on_token)
    texts = [tok.decode(t, skip_special_tokens=True) for t in g.tokens]
    for row, text in enumerate(texts):
        if on_text and len(text) > shown[row]:
            on_text(row, text[shown[row]:])
    stats = {"prefill_s": round(g.prefill_s, 4), "decode_s": round(g.decode_s, 4),
             "new_tokens": sum(len(t) for t in g.tokens), "prefill_chunks": g.chunks,
             "prompt_tokens": [len(r["input_ids"]) for r in rows], "images": [i is not None for i in images],
             "tokenizer": "processor"}
    return g.tokens, texts, stats

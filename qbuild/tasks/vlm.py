"""Image-text-to-text (Gemma 3, Llama 4) as two programs: the vision encoder and the language decoder.

Vision (task ``vlm_vision``, stages ``export_vision`` -> ``compile_vision``): input ``pixel_values`` float
``[batch_size, 3, img, img]``, output ``vision_embeds`` float ``[batch_size, rows, text hidden]`` (already
projected). One specialisation ``Vision``: ``{batch_size: vlm.vision_batch_size, img_size}``; Llama 4's dim 0
is ``max_num_tiles`` (tiles: ``vlm.max_num_tiles`` per image, zero-padded by the runtime), its rows per tile.

Language (task ``image_text_to_text``, stages ``export`` -> ``compile``): qbuild.vlm.decoder's graph, inputs
``input_ids``, ``vision_embeds [batch_size, vision_size, hidden]``, ``position_ids``, ``image_idx [batch_size, 1]``
and the KV caches of ``causal_lm_kv``; outputs ``logits``, ``vision_embeds_RetainedState``, ``image_idx_output``
and the retained caches. One Prefill per bucket and a Decode, each with ``vision_size`` (rows per image).
Beside the graph, ``vlm.json`` (what the runtime needs: image token, vision size, hidden size).

Verify: greedy tokens of both built programs on a batch (two synthetic images of different content with
the verify prompts, and one prompt without an image) must equal transformers' ``generate(do_sample=False)``
on each row with the same processor output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import ExportError, VerifyError, one_line
from qbuild.manifest.schema import Manifest
from qbuild.tasks import Task
from qbuild.tasks.export_common import (
    DATA_FILE,
    MODEL_FILE,
    check_model,
    gather_external_data,
    legacy_export,
    output_files,
    quiet,
)

if TYPE_CHECKING:
    from qbuild.runtime import Artifact
    from qbuild.stages.base import StageContext
    from qbuild.stages.export import ExportParams
    from qbuild.stages.verify import VerifyParams

CODE = ("tasks/__init__.py", "tasks/vlm.py", "tasks/export_common.py", "tasks/kv_causal_lm.py", "vlm/*.py")
META_FILE = "vlm.json"


@dataclass(frozen=True)
class LangExport:
    graph: str = "plain"  # "qaic": CtxScatter/CtxGather and CustomRMSNorm (a build compiled by qaic)
    dtype: str | None = None
    vision_size: int = 0  # rows of vision_embeds per image (Llama 4: per tile x vlm.max_num_tiles), for vlm.json


@dataclass(frozen=True)
class VLMVerify:
    prompts: tuple[str, ...]
    max_new_tokens: int
    lengths: tuple[int, ...]
    ctx_len: int


def _check_exporter(exporter: str) -> None:
    if exporter != "legacy":
        raise ExportError(f"export.exporter: {exporter}: image-text-to-text exports with the legacy exporter only",
                          hint="set export.exporter=legacy")


class VisionTask(Task):
    name = "vlm_vision"
    code = CODE
    vision_io = True  # qaic: pixel_values and vision_embeds in custom_io.yaml

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        from qbuild.vlm import vision_facts

        f = vision_facts(m)
        batch = m.vlm.vision_batch_size
        if f.family == "llama4":  # pixel_values' dim 0 counts tiles: max_num_tiles for each image of a run
            return [{"name": "Vision", "symbols": {"batch_size": batch, "max_num_tiles": batch * f.max_num_tiles,
                                                   "img_size": f.img_size}}]
        return [{"name": "Vision", "symbols": {"batch_size": batch, "img_size": f.img_size}}]

    def export(self, model: Any, out: Path, p: ExportParams, ctx: StageContext) -> dict[str, Any]:
        import torch

        from qbuild.vlm.model import family, vision_encoder

        _check_exporter(p.exporter)
        encoder = vision_encoder(model)
        cfg = model.config.vision_config
        dtype = next(encoder.parameters()).dtype
        args = (torch.randn(2, getattr(cfg, "num_channels", 3), cfg.image_size, cfg.image_size).to(dtype),)
        dim = getattr(family(model.config.model_type), "VISION_DIM", "batch_size")  # Llama 4: max_num_tiles
        axes = {"pixel_values": {0: dim}, "vision_embeds": {0: dim}}
        path = _export(encoder, args, Path(out), p.opset, (["pixel_values"], ["vision_embeds"]), axes)
        with torch.no_grad():
            rows, hidden = encoder(args[0][:1]).shape[-2:]
        return {"onnx": path.name, "inputs": ["pixel_values"], "outputs": ["vision_embeds"], "img_size": cfg.image_size,
                "vision_size": int(rows), "hidden_size": int(hidden), "exporter": p.exporter, "opset": p.opset}


class VLMTask(Task):
    name = "image_text_to_text"
    code = CODE
    retained_state = True
    qaic_graph = True
    vision_io = True  # qaic: vision_embeds and its retained output in custom_io.yaml, beside the KV

    def export_options(self, m: Manifest) -> LangExport:
        from qbuild.backends.qaic import export_graph
        from qbuild.vlm import vision_facts

        qaic, size = export_graph(m), vision_facts(m).vision_size
        return LangExport(vision_size=size) if qaic is None else LangExport("qaic", qaic.dtype, size)

    def export(self, model: Any, out: Path, p: ExportParams, ctx: StageContext) -> dict[str, Any]:
        from qbuild.tasks.kv_causal_lm import _finish, graph_form
        from qbuild.vlm.decoder import dynamic_axes, example_inputs, io_names
        from qbuild.vlm.model import decoder, load_processor

        _check_exporter(p.exporter)
        o = p.options if isinstance(p.options, LangExport) else LangExport()
        dec = decoder(model)
        lm = dec.lm
        hidden, vision_size = int(lm.config.hidden_size), o.vision_size or _vision_rows(model, 1)
        names = io_names(lm.kv_num_layers())
        with quiet(), graph_form(lm, o.graph, o.dtype) as form:
            args = example_inputs(dec, vision_size, hidden)
            path = _export(dec, args, Path(out), p.opset, names, dynamic_axes(*names))
            _finish(path, p.opset, dec.vocab_size, names[1])
        check_model(path)
        heads, head_dim = lm.kv_cache_shape()
        meta = {"family": model.config.model_type, "image_token_id": dec.image_token_id, "vision_size": vision_size,
                "hidden_size": hidden, "bidirectional_images": dec.bidirectional_images,
                "eos_token_id": model.generation_config.eos_token_id}
        (Path(out) / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        load_processor(ctx.model_dir(p.model)).save_pretrained(Path(out) / "processor")
        return {"onnx": path.name, "inputs": names[0], "outputs": names[1], "num_layers": lm.kv_num_layers(),
                "num_kv_heads": heads, "head_dim": head_dim, "vocab_size": dec.vocab_size, "vlm": meta,
                "exporter": p.exporter, "opset": p.opset, "graph_form": {k: v for k, v in form.items()}}

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        """One Prefill per bucket, then Decode, each with ``vision_size`` (QEfficient's lang specialisations)."""
        from qbuild.tasks.kv_causal_lm import KVCausalLMTask
        from qbuild.vlm import vision_facts

        vision_size = vision_facts(m).vision_size
        return [{"name": s["name"], "symbols": {**s["symbols"], "vision_size": vision_size}}
                for s in KVCausalLMTask().specializations(m)]

    def verify_options(self, m: Manifest) -> VLMVerify:
        v = m.verify
        return VLMVerify(tuple(v.prompts), v.max_new_tokens, tuple(m.seq.lengths), m.seq.ctx_len)

    def verify(self, p: VerifyParams, ctx: StageContext, artifact: Artifact) -> dict[str, Any]:
        """Greedy tokens of the two programs on image+prompt rows must equal HF ``generate(do_sample=False)``."""
        from qbuild.tasks.kv_causal_lm import first_difference
        from qbuild.vlm.images import synthetic_images
        from qbuild.vlm.runtime import hf_greedy, prepare

        o: VLMVerify = p.check
        rt = self.runtime(ctx, o)
        images = synthetic_images()
        rows = [(images[0], o.prompts[0]), (images[1], o.prompts[-1]), (None, o.prompts[0])]
        inputs = prepare(rt.processor, [r[0] for r in rows], [r[1] for r in rows])
        ctx.progress(f"HF generate: {len(rows)} rows x {o.max_new_tokens} tokens", None)
        vlm = _memo_vlm(ctx, p)
        expected = [hf_greedy(vlm, x, o.max_new_tokens) for x in inputs]
        ctx.progress(f"generate with the compiled programs ({artifact.backend})", None)
        got = rt.run(inputs, o.max_new_tokens).tokens
        for (image, text), want, have in zip(rows, expected, got, strict=True):
            if want != have:
                at = first_difference(want, have)
                what = "with an image" if image is not None else "without an image"
                raise VerifyError(f"greedy tokens differ from HF generate for prompt {text!r} {what} at new token "
                                  f"{at}: expected {want[at:at + 4]}..., got {have[at:at + 4]}...",
                                  hint="compare `qbuild run --image` with transformers generate on the same weights")
        return {"prompts": [r[1] for r in rows], "images": [r[0] is not None for r in rows],
                "max_new_tokens": o.max_new_tokens, "tokens": got,
                "prompt_tokens": [len(x["input_ids"]) for x in inputs]}

    def runtime(self, ctx: StageContext, o: VLMVerify) -> Any:
        """The generation loop on the built programs (here: the language and the vision program)."""
        from qbuild.vlm.runtime import VLMRuntime

        return VLMRuntime(ctx.inputs["compile"].out, ctx.inputs["compile_vision"].out, ctx.inputs["export"].out,
                          ctx_len=o.ctx_len, buckets=o.lengths)


def _vision_rows(vlm: Any, tiles: int) -> int:
    """Rows of vision_embeds per image (Gemma3: mm_tokens_per_image; Llama 4: rows per tile x max_num_tiles)."""
    from qbuild.vlm.model import family

    return int(family(vlm.config.model_type).vision_rows(vlm.config)) * tiles


def _memo_vlm(ctx: StageContext, p: Any) -> Any:
    """The VLM of ``p.model`` loaded once per build (the export stages and verify share it)."""
    from qbuild.vlm.model import load

    directory = ctx.model_dir(p.model)
    key = ("vlm", str(directory), p.model.dtype)
    if key not in ctx.memo:
        ctx.progress("loading model", None)
        ctx.memo[key] = load(directory, p.model.dtype)
    return ctx.memo[key]


def _export(module: Any, args: tuple[Any, ...], out: Path, opset: int, names: tuple[list[str], list[str]],
            axes: dict[str, dict[int, str]]) -> Path:
    """Legacy-export ``module`` to ``out/model.onnx`` with its weights in one external data file."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    before = output_files(out)
    try:
        with quiet():
            legacy_export(module, args, path, input_names=names[0], output_names=names[1], dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True)
        gather_external_data(path, output_files(out) - before - {MODEL_FILE, DATA_FILE})
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"legacy export to {path} failed: {one_line(exc)}") from exc
    if names[1] == ["vision_embeds"]:
        check_model(path)
    return path

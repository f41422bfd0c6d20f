"""Image-text-to-text (Gemma 3, Llama 4) as one program: ``vlm.mode: single`` (QEfficient's ``kv_offload=False``).

Stages ``load -> export -> compile -> verify``. The graph is qbuild.vlm.single's: inputs ``pixel_values``
(float ``[N, 3, img, img]``: images for Gemma 3, tiles for Llama 4), ``input_ids``, ``position_ids``,
``image_idx [batch_size, 1]`` and the KV caches of ``causal_lm_kv``; outputs ``logits``,
``pixel_values_RetainedState``, ``image_idx_output`` and the retained caches. The vision encoder and the
merge are the dual mode's (qbuild.tasks.vlm), so are the verify rows (two synthetic images and a text-only
prompt in one batch, against transformers' ``generate(do_sample=False)``).

Specialisations, QEfficient's single-QPC lang list (reference 1.5): one Prefill per bucket and a Decode, each
with ``img_size``; Gemma 3 adds ``vision_size`` and ``vision_batch_size`` (= ``batch_size``, the dim of
``pixel_values``), Llama 4 adds ``max_num_tiles`` (``batch_size x vlm.max_num_tiles``, the dim of
``pixel_values``) and no ``vision_size``. On qaic, ``custom_io.yaml`` lists ``pixel_values`` and
``pixel_values_RetainedState`` at the mapped model dtype before the KV entries (reference 1.6).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.manifest.schema import Manifest
from qbuild.tasks.export_common import check_model, quiet
from qbuild.tasks.vlm import META_FILE, VLMTask, VLMVerify, _check_exporter, _export

if TYPE_CHECKING:
    from qbuild.stages.base import StageContext
    from qbuild.stages.export import ExportParams

#: Gemma 3's pixel_values count images (QEfficient's vision_batch_size); Llama 4's count tiles (its VISION_DIM)
PIXEL_DIMS = {"gemma3": "vision_batch_size", "llama4": "max_num_tiles"}


@dataclass(frozen=True)
class SingleExport:
    graph: str = "plain"  # "qaic": CtxScatter/CtxGather and CustomRMSNorm (a build compiled by qaic)
    dtype: str | None = None


class VLMSingleTask(VLMTask):
    name = "image_text_to_text_single"
    code = (*VLMTask.code, "tasks/vlm_single.py")

    def export_options(self, m: Manifest) -> SingleExport:
        from qbuild.backends.qaic import export_graph

        qaic = export_graph(m)
        return SingleExport() if qaic is None else SingleExport("qaic", qaic.dtype)

    def export(self, model: Any, out: Path, p: ExportParams, ctx: StageContext) -> dict[str, Any]:
        from qbuild.tasks.kv_causal_lm import _finish, graph_form
        from qbuild.vlm.model import decoder, family, load_processor, vision_encoder
        from qbuild.vlm.single import SingleProgram, dynamic_axes, example_inputs, io_names

        _check_exporter(p.exporter)
        o = p.options if isinstance(p.options, SingleExport) else SingleExport()
        dec = decoder(model)
        program = SingleProgram(vision_encoder(model), dec)
        lm, cfg, kind = dec.lm, model.config.vision_config, model.config.model_type
        names = io_names(lm.kv_num_layers())
        with quiet(), graph_form(lm, o.graph, o.dtype) as form:
            args = example_inputs(program, getattr(cfg, "num_channels", 3), cfg.image_size)
            path = _export(program, args, Path(out), p.opset, names, dynamic_axes(*names, PIXEL_DIMS[kind]))
            _finish(path, p.opset, dec.vocab_size, names[1])
        check_model(path)
        heads, head_dim = lm.kv_cache_shape()
        meta = {"family": kind, "mode": "single", "image_token_id": dec.image_token_id,
                "tile_rows": int(family(kind).vision_rows(model.config)), "img_size": int(cfg.image_size),
                "channels": int(getattr(cfg, "num_channels", 3)), "hidden_size": int(lm.config.hidden_size),
                "bidirectional_images": dec.bidirectional_images, "eos_token_id": model.generation_config.eos_token_id}
        (Path(out) / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        load_processor(ctx.model_dir(p.model)).save_pretrained(Path(out) / "processor")
        return {"onnx": path.name, "inputs": names[0], "outputs": names[1], "num_layers": lm.kv_num_layers(),
                "num_kv_heads": heads, "head_dim": head_dim, "vocab_size": dec.vocab_size, "vlm": meta,
                "exporter": p.exporter, "opset": p.opset, "graph_form": dict(form)}

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        """One Prefill per bucket, then Decode, with the single QPC's image symbols (reference 1.5)."""
        from qbuild.tasks.kv_causal_lm import KVCausalLMTask
        from qbuild.vlm import vision_facts

        f, batch = vision_facts(m), m.seq.batch_size
        if f.family == "llama4":  # QEfficient's single variant drops vision_size
            extra = {"max_num_tiles": batch * f.max_num_tiles, "img_size": f.img_size}
        else:
            extra = {"img_size": f.img_size, "vision_size": f.vision_size, "vision_batch_size": batch}
        return [{"name": s["name"], "symbols": {**s["symbols"], **extra}} for s in KVCausalLMTask().specializations(m)]

    def runtime(self, ctx: StageContext, o: VLMVerify) -> Any:
        from qbuild.vlm.runtime import VLMSingleRuntime

        return VLMSingleRuntime(ctx.inputs["compile"].out, ctx.inputs["export"].out, ctx_len=o.ctx_len,
                                buckets=o.lengths)

"""Llama 4 (``Llama4ForConditionalGeneration``): images are cut into square tiles (plus a global tile) by the
processor; each tile goes through the vision model (unfold-conv patches + a class token, 2-D RoPE attention
layers, pixel shuffle and the vision adapter MLP), then the multi-modal projector to the text hidden size.
The text model is Llama 4's (chunked attention, NoPE layers, MoE), rewritten by the ``llama4_text`` KV family
(qbuild.transforms.models.llama4). Image tokens attend causally, as in transformers.

The vision program is QEfficient's ``QEffLlama4EncoderWrapper`` (reference 1.3): ``pixel_values
[max_num_tiles, 3, img, img] -> vision_embeds`` (here ``[max_num_tiles, rows per tile, hidden]``; the runtime
takes each image's first ``tiles x rows``). Written out here rather than calling ``get_image_features`` because
transformers' vision RoPE multiplies complex numbers, which no ONNX exporter takes: the same rotation is
applied in real arithmetic on the even and odd lanes, and the unfold + linear patch embedding as the equal
strided convolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qbuild.transforms.models.llama4 import rope_interleaved

#: image tokens attend causally (transformers' Llama 4 builds no image block mask)
BIDIRECTIONAL_IMAGES = False
#: the dim of pixel_values that counts tiles (QEfficient's specialisation symbol)
VISION_DIM = "max_num_tiles"
#: a tiny twin's processor cuts an image into at most this many tiles (+ the global one): vlm.max_num_tiles 5
TINY_MAX_PATCHES = 4
#: the tokens Llama4Processor expands an image into, and the chat template's; a tiny twin puts them at the last
#: ids of its vocabulary, in this order, with image_start / image_end / patch at the config's boi / eoi / image ids
SPECIALS = ("<|header_start|>", "<|header_end|>", "<|eot|>", "<|image_start|>", "<|image_end|>", "<|image|>",
            "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>")


class VisionEncoder(torch.nn.Module):
    """``pixel_values [T,3,img,img] -> vision_embeds [T, rows per tile, text hidden]`` on the VLM's weights."""

    def __init__(self, vlm: Any) -> None:
        super().__init__()
        self.vision, self.projector = vlm.vision_model, vlm.multi_modal_projector
        rotary = self.vision.rotary_embedding  # recomputed: Module.to(dtype) makes its complex buffer real
        freqs = rotary._compute_freqs_ci(rotary.config)  # complex [P+1, 1, D/2] (the class token's angle is 0)
        self.register_buffer("cos", freqs.real[None].float(), persistent=False)  # [1,P+1,1,D/2]
        self.register_buffer("sin", freqs.imag[None].float(), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v = self.vision
        linear = v.patch_embedding.linear  # [E, C*p*p]: unfold's (channel, row, column) order
        p = v.patch_size
        kernel = linear.weight.view(linear.weight.shape[0], -1, p, p)  # [E,C,p,p]
        x = torch.nn.functional.conv2d(pixel_values.to(kernel.dtype), kernel, stride=p)  # [T,E,h,w]
        h = x.flatten(2).transpose(1, 2)  # [T,P,E] patches row by row
        cls = v.class_embedding.expand(h.shape[0], 1, h.shape[-1])  # [T,1,E]
        h = v.layernorm_pre(torch.cat([h, cls], dim=1) + v.positional_embedding_vlm)  # [T,P+1,E]
        for layer in v.model.layers:
            h = h + self.attention(layer.self_attn, layer.input_layernorm(h))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = v.layernorm_post(h)[:, :-1]  # [T,P,E] without the class token
        h = v.vision_adapter(h)  # pixel shuffle + MLP: [T, P * ratio^2, projector_output_dim]
        return self.projector(h)  # [T, rows, text hidden]

    def attention(self, attn: Any, x: torch.Tensor) -> torch.Tensor:
        """Bidirectional attention over a tile's patches with the 2-D RoPE; ``x [T,N,E]``."""
        t, n, _ = x.shape
        d = attn.head_dim
        q = rope_interleaved(attn.q_proj(x).view(t, n, -1, d), self.cos, self.sin).transpose(1, 2)  # [T,H,N,D]
        k = rope_interleaved(attn.k_proj(x).view(t, n, -1, d), self.cos, self.sin).transpose(1, 2)
        v = attn.v_proj(x).view(t, n, -1, d).transpose(1, 2)
        weights = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * d ** -0.5, dim=-1)  # [T,H,N,N]
        return attn.o_proj(torch.matmul(weights, v).transpose(1, 2).reshape(t, n, -1))


def text_lm(vlm: Any) -> Any:
    """A ``Llama4ForCausalLM`` sharing the VLM's text model and head (no weights copied; the VLM's own
    ``language_model`` keeps its class, so transformers' generate still runs on it)."""
    from transformers import Llama4ForCausalLM

    with torch.device("meta"):
        lm = Llama4ForCausalLM(vlm.config.get_text_config())
    lm.model = vlm.language_model.model
    lm.lm_head = vlm.language_model.lm_head
    return lm.eval()


def fix_transformers(vlm: Any) -> None:
    """transformers 5.24's ``Llama4ForConditionalGeneration.forward`` reads ``image_outputs`` from its language
    model's output, which has none (every call with ``return_dict=True`` fails, so does ``generate``): a forward
    hook adds ``image_outputs=None`` there when it is missing. No value of the computation changes."""

    def hook(module: Any, args: Any, output: Any) -> Any:
        if not hasattr(output, "image_outputs"):
            object.__setattr__(output, "image_outputs", None)
        return output

    vlm.language_model.register_forward_hook(hook)


def image_token_id(vlm: Any) -> int:
    return int(vlm.config.image_token_id)  # <|patch|>


def vision_rows(config: Any) -> int:
    """Rows of ``vision_embeds`` per tile: ``(img / patch)^2 / round(1 / ratio^2)``."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 // round(1 / v.pixel_shuffle_ratio ** 2)


def randomize(model: Any) -> None:
    """Random-init touch-ups: with transformers' std 0.02 through the adapter's two GELU layers and the
    projector, a tiny twin's image embeddings are ~1e-3 and two images give the same tokens; std 0.2 there."""
    with torch.no_grad():
        for linear in (model.vision_model.vision_adapter.mlp.fc1, model.vision_model.vision_adapter.mlp.fc2,
                       model.multi_modal_projector.linear_1):
            linear.weight.normal_(0.0, 0.2)


def tiny_processor(config: Any, out: Path) -> Any:
    """A ``Llama4Processor`` for a tiny twin: BPE + :data:`SPECIALS` at the top of the vocabulary, our tiler at
    the config's image size (``TINY_MAX_PATCHES`` tiles at most), transformers' Llama 4 chat template."""
    from qbuild.errors import LoadError
    from qbuild.vlm.model import special_tokenizer

    vocab = config.text_config.vocab_size
    ids = dict(zip(SPECIALS, range(vocab - len(SPECIALS), vocab), strict=True))
    want = {"<|image_start|>": config.boi_token_index, "<|image_end|>": config.eoi_token_index,
            "<|patch|>": config.image_token_index}
    if any(ids[t] != i for t, i in want.items()):
        raise LoadError(f"model.config: a tiny Llama 4 twin puts {', '.join(SPECIALS)} at ids {vocab - len(SPECIALS)}"
                        f"..{vocab - 1}, so boi_token_index, eoi_token_index, image_token_index must be "
                        f"{[ids[t] for t in want]}; got {list(want.values())}")
    specials = {f"llama4_{i}": (t, ids[t]) for i, t in enumerate(SPECIALS)}
    tok = special_tokenizer(vocab, specials, out)
    size = config.vision_config.image_size
    from qbuild.vlm.tiler import Llama4Tiler

    return processor(Llama4Tiler(size={"height": size, "width": size}, max_patches=TINY_MAX_PATCHES), tok,
                     config.vision_config.patch_size, config.vision_config.pixel_shuffle_ratio, None)


def processor(tiler: Any, tokenizer: Any, patch_size: int, ratio: float, chat_template: str | None) -> Any:
    """transformers' ``Llama4Processor`` (image token expansion, chat template) around our tiler."""
    from transformers.models.llama4.processing_llama4 import Llama4Processor
    from transformers.models.llama4.processing_llama4 import chat_template as default

    return Llama4Processor(image_processor=tiler, tokenizer=tokenizer, patch_size=patch_size,
                           pixel_shuffle_ratio=ratio, chat_template=chat_template or default)


def load_processor(directory: Path) -> Any:
    """A saved Llama 4 processor (a checkpoint's or ours), offline, with our tiler for its image processor."""
    import json

    from transformers import AutoTokenizer

    from qbuild.vlm.tiler import Llama4Tiler

    def read(name: str) -> dict[str, Any]:
        path = directory / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    config = read("processor_config.json")
    images = read("preprocessor_config.json") or config.get("image_processor", {})
    template = directory / "chat_template.jinja"
    chat = template.read_text(encoding="utf-8") if template.is_file() else read("chat_template.json").get(
        "chat_template")
    tiler = Llama4Tiler(**{k: images[k] for k in ("size", "max_patches", "resize_to_max_canvas", "image_mean",
                                                  "image_std", "rescale_factor") if k in images})
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return processor(tiler, tok, int(config.get("patch_size", 14)), float(config.get("pixel_shuffle_ratio", 0.5)),
                     chat)

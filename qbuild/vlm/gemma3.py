"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP vision tower, then the projector (average pool to
``mm_tokens_per_image`` tokens, soft-embedding RMSNorm, matmul to the text hidden size); the text model is
Gemma3's, rewritten by the ``gemma3_text`` KV family (qbuild.transforms.models.gemma3).
"""

from __future__ import annotations

from typing import Any

import torch

#: transformers' token_type_ids block mask: an image's tokens attend to each other (qbuild.vlm.decoder)
BIDIRECTIONAL_IMAGES = True


class VisionEncoder(torch.nn.Module):
    """``pixel_values [B,3,img,img] -> vision_embeds [B, mm_tokens_per_image, text hidden]``
    (QEfficient's ``QEffGemma3EncoderWrapper``: ``get_image_features`` then its pooler output)."""

    def __init__(self, vlm: Any) -> None:
        super().__init__()
        self.inner = vlm.model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner.get_image_features(pixel_values, return_dict=True).pooler_output


def text_lm(vlm: Any) -> Any:
    """A ``Gemma3ForCausalLM`` sharing the VLM's language model and head (no weights copied)."""
    from transformers import Gemma3ForCausalLM

    config = vlm.config.get_text_config()
    with torch.device("meta"):
        lm = Gemma3ForCausalLM(config)
    lm.model = vlm.model.language_model
    lm.lm_head = vlm.lm_head
    return lm.eval()


def image_token_id(vlm: Any) -> int:
    return int(vlm.config.image_token_id)


def tiny_processor(config: Any, out: Any) -> Any:
    """A ``Gemma3Processor`` for a tiny twin: BPE + boi/image/eoi tokens at the config's ids, the PIL image
    processor at the config's image size, ``mm_tokens_per_image`` image tokens per image."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    from qbuild.vlm.model import CHAT_TEMPLATE, special_tokenizer

    specials = {"boi_token": ("<start_of_image>", config.boi_token_index),
                "image_token": ("<image_soft_token>", config.image_token_id),
                "eoi_token": ("<end_of_image>", config.eoi_token_index)}
    tok = special_tokenizer(config.text_config.vocab_size, specials, out)
    size = config.vision_config.image_size
    images = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    template = CHAT_TEMPLATE.replace("{{ image_placeholder }}", "<start_of_image>")
    return Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=config.mm_tokens_per_image,
                           chat_template=template)


def randomize(model: Any) -> None:
    """Random-init touch-ups: the projector's weight starts at zeros in transformers (every image would embed
    as zeros); a tiny twin gets it random so that its images change its tokens."""
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.normal_(0.0, 0.1)


def vision_rows(config: Any) -> int:
    """Rows of ``vision_embeds`` per image."""
    return int(config.mm_tokens_per_image)

"""The language program of a VLM: the retained-state KV decoder (``qbuild.transforms.kv_cache``) with the
image embeddings merged in, QEfficient's ``QEff*DecoderWrapper`` (reference 1.4)::

    forward(input_ids [B,S], vision_embeds [B,V,H], position_ids [B,S], image_idx [B,1], past_key.i, ...)
        -> (logits [B,1,vocab], vision_embeds_RetainedState, image_idx_output [B,1], past_*_RetainedState ...)

Merge: the image-token positions of a row take rows of that row's ``vision_embeds``, at the running index
``image_idx + cumsum(is_image) - 1``; ``image_idx_output = image_idx + (image tokens in the chunk)`` is fed
back as the next prefill chunk's ``image_idx`` (it never resets on a chunk without image tokens, the
Gemma3 slip the reference notes). Deliberate differences from QEfficient:

* ``vision_embeds`` is per row (``[B, V, H]``, each row its own image), not one tensor flattened and shared by
  the whole batch, so a batch of image+prompt pairs merges each row with its own image (the single program,
  qbuild.vlm.single, passes one flattened table ``[N, H]`` instead, each row's ``image_idx`` its offset);
* ``image_idx < 0`` marks a row (or a decode step) without an image: nothing is merged there (QEfficient drops
  the merge when ``seq_len == 1``), so a text-only prompt, and a generated token equal to the image token, embed
  as text, as transformers does;
* Gemma3's image tokens attend to each other bidirectionally (transformers' ``token_type_ids`` block mask on
  the prefill): a query at an image token also sees the later image tokens of its block in this chunk (the
  runtime keeps an image's tokens in one prefill chunk). QEfficient's graph is causal only.
"""

from __future__ import annotations

from typing import Any

import torch

from qbuild.transforms.kv_cache import last_valid


def image_block_mask(selected: torch.Tensor, position_ids: torch.Tensor, ctx_len: Any) -> torch.Tensor:
    """``[B,1,S,C]``: the query at an image token may see cache slot ``c`` holding an image token of its own
    block of consecutive image tokens in this chunk."""
    prev = torch.nn.functional.pad(selected, (1, 0), value=False)[:, :-1]  # [B,S]
    block = torch.cumsum((selected & ~prev).to(torch.int64), dim=1)  # [B,S] block number (0: before any)
    same = (block[:, :, None] == block[:, None, :]) & selected[:, :, None] & selected[:, None, :]  # [B,S,S]
    slots = torch.arange(ctx_len, dtype=position_ids.dtype)[None, None, :]  # [1,1,C]
    onehot = (position_ids[:, :, None] == slots).to(torch.float32)  # [B,S,C] key j -> its slot
    return (torch.bmm(same.to(torch.float32), onehot) > 0)[:, None]  # [B,1,S,C]


class VLMDecoder(torch.nn.Module):
    """A ``kv_cache``-rewritten text causal LM (``lm``) behind QEfficient's VLM decoder signature."""

    def __init__(self, lm: Any, image_token_id: int, *, bidirectional_images: bool) -> None:
        super().__init__()
        self.lm = lm
        self.image_token_id = int(image_token_id)
        self.bidirectional_images = bidirectional_images
        self.vocab_size = int(lm.config.vocab_size)

    def forward(self, input_ids: torch.Tensor, vision_embeds: torch.Tensor, position_ids: torch.Tensor,
                image_idx: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lm = self.lm
        position_ids = position_ids.to(torch.int64)
        has_image = image_idx >= 0  # [B,1]
        selected = (input_ids == self.image_token_id) & has_image  # [B,S]
        ids = input_ids
        if self.image_token_id >= self.vocab_size:  # out of the vocabulary: embedded as 0, as transformers does
            ids = torch.where(input_ids == self.image_token_id, torch.zeros_like(input_ids), input_ids)
        text = lm.kv_embed(ids, position_ids)  # [B,S,H]
        count = torch.cumsum(selected.to(torch.int64), dim=1)  # [B,S]
        index = torch.where(selected, count - 1 + image_idx, torch.zeros_like(count))  # [B,S] rows of vision_embeds
        if vision_embeds.dim() == 2:  # one table [N,H] shared by the batch (the single program): rows by index
            rows = vision_embeds[index]  # [B,S,H]
        else:
            rows = torch.gather(vision_embeds, 1, index[:, :, None].expand(-1, -1, vision_embeds.shape[-1]))
        h = torch.where(selected[:, :, None], rows.to(text.dtype), text)  # [B,S,H]
        image_idx_out = torch.where(has_image, image_idx + count[:, -1:], image_idx)  # [B,1]
        ctx = lm.kv_context(input_ids, position_ids, past[0].shape[2])
        if self.bidirectional_images:
            ctx["masks"] = self.image_masks(ctx["masks"], selected, position_ids, past[0].shape[2])
        new: list[torch.Tensor] = []
        for i, layer in enumerate(lm.kv_layers()):
            h, k, v = lm.kv_layer(i, layer, h, ctx, past[2 * i], past[2 * i + 1])
            new += [k, v]
        h = last_valid(h, position_ids)  # [B,1,H]
        logits = lm.lm_head(lm.kv_final_norm(h)).float()  # [B,1,V]: a VLM applies no final soft-capping
        return (logits, vision_embeds, image_idx_out, *new)

    def image_masks(self, masks: dict[str, torch.Tensor], selected: torch.Tensor, position_ids: torch.Tensor,
                    ctx_len: Any) -> dict[str, torch.Tensor]:
        """Each layer type's mask OR the image block mask (within the sliding window on sliding layers)."""
        extra = image_block_mask(selected, position_ids, ctx_len)  # [B,1,S,C]
        window = getattr(self.lm.config, "sliding_window", None)
        out = {}
        for kind, mask in masks.items():
            if kind == "sliding_attention" and window:
                slots = torch.arange(ctx_len, dtype=position_ids.dtype)[None, None, None, :]  # [1,1,1,C]
                out[kind] = mask | (extra & (slots > position_ids[:, None, :, None] - window))
            else:
                out[kind] = mask | extra
        return out


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names of the language program."""
    cache = [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "vision_embeds", "position_ids", "image_idx", *cache]
    outputs = ["logits", "vision_embeds_RetainedState", "image_idx_output", *(f"{n}_RetainedState" for n in cache)]
    return inputs, outputs


def dynamic_axes(inputs: list[str], outputs: list[str]) -> dict[str, dict[int, str]]:
    seq = {0: "batch_size", 1: "seq_len"}
    vision = {0: "batch_size", 1: "vision_size"}
    axes: dict[str, dict[int, str]] = {"input_ids": seq, "position_ids": seq, "vision_embeds": vision,
                                       "vision_embeds_RetainedState": vision, "image_idx": {0: "batch_size"},
                                       "image_idx_output": {0: "batch_size"}, "logits": {0: "batch_size"}}
    for name in [*inputs[4:], *outputs[3:]]:
        axes[name] = {0: "batch_size", 2: "ctx_len"}
    return axes


def example_inputs(decoder: VLMDecoder, vision_size: int, hidden: int) -> tuple[torch.Tensor, ...]:
    """Batch 2 (one row with an image at a running index, one left-padded text row), random caches: the dims
    differ from each other and from the model's sizes so that none get unified."""
    lm = decoder.lm
    gen = torch.Generator().manual_seed(0)
    batch, seq, ctx_len = 2, 7, 23
    input_ids = torch.randint(0, decoder.vocab_size, (batch, seq), generator=gen)
    input_ids[0, 2:4] = decoder.image_token_id
    position_ids = torch.arange(seq).repeat(batch, 1) + 1
    position_ids[1, :2] = -1
    image_idx = torch.tensor([[1], [-1]])
    dtype = next(lm.parameters()).dtype
    vision = torch.randn(batch, vision_size + 3, hidden, generator=gen).to(dtype)
    heads, head_dim = lm.kv_cache_shape()
    past = [torch.randn(batch, heads, ctx_len, head_dim, generator=gen).to(dtype)
            for _ in range(2 * lm.kv_num_layers())]
    return (input_ids, vision, position_ids, image_idx, *past)

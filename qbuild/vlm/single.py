"""The single program of a VLM (``vlm.mode: single``, QEfficient's ``kv_offload=False``, reference 1.5-1.8)::

    forward(pixel_values [N,3,img,img], input_ids [B,S], position_ids [B,S], image_idx [B,1], past_key.i, ...)
        -> (logits [B,1,vocab], pixel_values_RetainedState, image_idx_output [B,1], past_*_RetainedState ...)

The family's vision encoder (qbuild.vlm.gemma3 / llama4 ``VisionEncoder``) turns the ``N`` images (Gemma 3)
or tiles (Llama 4) into ``[N, rows, H]``; flattened to one table ``[N * rows, H]`` with a zero row appended
(the row a position without an image gathers, then drops), it goes to :class:`qbuild.vlm.decoder.VLMDecoder`
as a ``vision_embeds`` shared by the batch: each row's ``image_idx`` is the offset of its image's first row
in the table (-1: no image, nothing merged), so the merge, the image block mask and ``image_idx_output`` are
the dual program's. ``pixel_values`` is returned unchanged as ``pixel_values_RetainedState``, so a compiled
program keeps it on the device across prefill chunks and decode steps.

Cost: the vision tower runs on every call, on what ``pixel_values`` holds. The runtime passes all images on a
prefill chunk and one zero image (Gemma 3) or tile (Llama 4) on a decode step and on a batch without images
(the traced encoder's reshapes cannot take ``N = 0``), so a decode step costs one image's (one tile's) vision
encoder on top of the decoder step; QEfficient's single QPC runs the tower on all retained images each step.
"""

from __future__ import annotations

import torch

from qbuild.vlm.decoder import VLMDecoder
from qbuild.vlm.decoder import example_inputs as decoder_inputs


class SingleProgram(torch.nn.Module):
    """A vision encoder and a :class:`VLMDecoder` as one graph (the decoder's merge, on a flattened table)."""

    def __init__(self, encoder: torch.nn.Module, decoder: VLMDecoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                image_idx: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embeds = self.encoder(pixel_values)  # [N, rows, H]
        hidden = embeds.shape[-1]
        table = torch.cat([embeds.reshape(-1, hidden), embeds.new_zeros(1, hidden)])  # [N*rows + 1, H]
        logits, _, image_idx_out, *new = self.decoder(input_ids, table, position_ids, image_idx, *past)
        return (logits, pixel_values, image_idx_out, *new)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names of the single program (QEfficient's single-QPC names)."""
    cache = [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["pixel_values", "input_ids", "position_ids", "image_idx", *cache]
    outputs = ["logits", "pixel_values_RetainedState", "image_idx_output", *(f"{n}_RetainedState" for n in cache)]
    return inputs, outputs


def dynamic_axes(inputs: list[str], outputs: list[str], pixel_dim: str) -> dict[str, dict[int, str]]:
    """``pixel_dim``: the symbol counting pixel_values' images (Gemma 3 ``vision_batch_size``) or tiles
    (Llama 4 ``max_num_tiles``)."""
    seq = {0: "batch_size", 1: "seq_len"}
    axes: dict[str, dict[int, str]] = {"pixel_values": {0: pixel_dim}, "pixel_values_RetainedState": {0: pixel_dim},
                                       "input_ids": seq, "position_ids": seq, "image_idx": {0: "batch_size"},
                                       "image_idx_output": {0: "batch_size"}, "logits": {0: "batch_size"}}
    for name in [*inputs[4:], *outputs[3:]]:
        axes[name] = {0: "batch_size", 2: "ctx_len"}
    return axes


def example_inputs(program: SingleProgram, channels: int, img_size: int) -> tuple[torch.Tensor, ...]:
    """The decoder's batch-2 example (qbuild.vlm.decoder.example_inputs) with 3 images (tiles) in place of its
    ``vision_embeds``: 3 differs from the batch, so the two dims are not unified."""
    dtype = next(program.encoder.parameters()).dtype
    pixels = torch.randn(3, channels, img_size, img_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    input_ids, _, position_ids, image_idx, *past = decoder_inputs(program.decoder, 2, 8)
    return (pixels, input_ids, position_ids, image_idx, *past)


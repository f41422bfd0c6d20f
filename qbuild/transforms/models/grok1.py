"""Grok-1 (qbuild's own ``qbuild/models/grok1.py``, model_type ``grok-1``) under the retained-state KV cache.

Differences from Llama, each an override below:

* embeddings times ``embedding_multiplier_scale``; logits times ``output_multiplier_scale``;
* "sandwich" norms: ``h = x + post_attn_norm(attn(pre_attn_norm(x)))``,
  ``out = h + post_moe_norm(moe(pre_moe_norm(h)))`` (RMSNorm on ``scale``, no +1 offset);
* scores scaled by ``attn_output_multiplier`` and soft-capped: ``max_attn_value * tanh(s / max_attn_value)``;
* MoE: softmax router over all experts in fp32, top-2 probabilities used **without** renormalisation,
  gated-GELU experts ``linear_1(gelu(linear(x)) * linear_v(x))``; every expert runs densely on every token
  with weight 0 where unselected, so no shape depends on the routing.
"""

from __future__ import annotations

from typing import Any

import torch

from qbuild.transforms.models.llama import KVLlama


class KVGrok1(KVLlama):
    kv_family = "grok1"

    def kv_layer_type(self, i: int) -> str:
        return "full_attention"

    def kv_context(self, input_ids: torch.Tensor, position_ids: torch.Tensor, ctx_len: Any) -> dict[str, Any]:
        from qbuild.models.grok1 import rope_cos_sin

        head_dim = self.kv_cache_shape()[1]
        rope = rope_cos_sin(position_ids, head_dim, self.kv_backbone().embed_tokens.weight.dtype)  # [B,S,D] pair
        return {"position_ids": position_ids, "masks": self.kv_masks(position_ids, ctx_len), "rope": rope}

    def kv_embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.kv_backbone().embed_tokens(input_ids) * self.config.embedding_multiplier_scale  # type: ignore[attr-defined]

    def kv_layer(self, i: int, layer: Any, h: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                 past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, k, v = self.kv_attention(i, layer.attn, layer.pre_attn_norm(h), ctx, past_k, past_v)
        h = h + layer.post_attn_norm(attn)
        h = h + layer.post_moe_norm(self.kv_moe(layer.moe_block, layer.pre_moe_norm(h)))
        return h, k, v

    def kv_prepare(self) -> dict[str, Any]:
        for layer in self.kv_layers():
            layer.attn.scaling = layer.attn.attn_output_multiplier  # the Llama attention path reads ``scaling``
        return {"softcap": self.config.max_attn_value, "num_experts": self.config.num_experts}  # type: ignore[attr-defined]

    def kv_softcap(self, attn: Any) -> float | None:
        return attn.max_attn_value

    def kv_moe(self, moe: Any, x: torch.Tensor) -> torch.Tensor:
        """Top-k softmax routing, not renormalised, evaluated densely; ``x [B,S,H]``."""
        b, s, hidden = x.shape
        tokens = x.reshape(-1, hidden)  # [T,H]
        probs = torch.softmax(moe.gate(tokens), dim=-1, dtype=torch.float32)  # [T,E]
        kth = torch.topk(probs, moe.top_k, dim=-1).values[:, -1:]  # [T,1] smallest selected probability
        weights = torch.where(probs >= kth, probs, torch.zeros_like(probs)).to(x.dtype)  # [T,E]
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(moe.experts):
            out = out + expert(tokens) * weights[:, e:e + 1]  # [T,H]
        return out.view(b, s, hidden)

    def kv_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.kv_head(h) * self.config.output_multiplier_scale  # type: ignore[attr-defined]

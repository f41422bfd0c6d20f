"""Gemma3 text (``Gemma3ForCausalLM``, model_type ``gemma3_text``) under the retained-state KV cache.

Differences from Llama, each an override below:

* embeddings are scaled by ``sqrt(hidden_size)`` (the embedding module does it);
* four "sandwich" RMSNorms per layer, each scaling by ``1 + w`` (the norm modules do it);
* q and k are RMS-normalised per head before RoPE; queries are scaled by ``query_pre_attn_scalar ** -0.5``;
* ``layer_types`` mixes ``sliding_attention`` (window ``sliding_window``, local RoPE base) and
  ``full_attention`` (global RoPE base): one mask and one rotary table per layer type;
* attention-logit soft-capping (``attn_logit_softcapping``) and final-logit soft-capping when configured.
"""

from __future__ import annotations

from typing import Any

import torch

from qbuild.transforms.models.llama import KVLlama, apply_rope


class KVGemma3(KVLlama):
    kv_family = "gemma3"

    def kv_layer_type(self, i: int) -> str:
        return self.config.layer_types[i]  # type: ignore[attr-defined]

    def kv_context(self, input_ids: torch.Tensor, position_ids: torch.Tensor, ctx_len: Any) -> dict[str, Any]:
        dummy = torch.empty(0, dtype=self.kv_backbone().embed_tokens.weight.dtype)
        kinds = sorted(set(self.config.layer_types))  # type: ignore[attr-defined]
        rope = {kind: self.kv_backbone().rotary_emb(dummy, position_ids, kind) for kind in kinds}  # [B,S,D] pairs
        return {"position_ids": position_ids, "masks": self.kv_masks(position_ids, ctx_len), "rope": rope}

    def kv_rope(self, i: int, q: torch.Tensor, k: torch.Tensor, ctx: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        cos, sin = ctx["rope"][self.kv_layer_type(i)]
        return apply_rope(q, k, cos, sin)

    def kv_softcap(self, attn: Any) -> float | None:
        return attn.attn_logit_softcapping

    def kv_layer(self, i: int, layer: Any, h: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                 past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, k, v = self.kv_attention(i, layer.self_attn, layer.input_layernorm(h), ctx, past_k, past_v)
        h = h + layer.post_attention_layernorm(attn)
        h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        return h, k, v

    def kv_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.kv_head(h)
        cap = self.config.final_logit_softcapping  # type: ignore[attr-defined]
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

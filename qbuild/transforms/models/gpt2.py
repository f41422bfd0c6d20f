"""GPT-2 (``GPT2LMHeadModel``) under the retained-state KV cache.

Differences from Llama: learned absolute position embeddings (``wpe``, looked up at the position ids;
padding positions -1 read row 0 and are masked anyway), one combined ``c_attn`` projection (a Conv1D:
``x @ W + b``, split into q, k, v), no RoPE, no grouped-query attention (kv heads = heads), LayerNorms,
scores scaled by ``1/sqrt(head_dim)`` (and ``1/(layer_idx+1)`` when ``scale_attn_by_inverse_layer_idx``).
"""

from __future__ import annotations

from typing import Any

import torch

from qbuild.transforms.kv_cache import attend, causal_mask
from qbuild.transforms.models.llama import FUSED, KVLlama


class KVGPT2(KVLlama):
    kv_family = "gpt2"

    def kv_backbone(self) -> Any:
        return self.transformer  # type: ignore[attr-defined]

    def kv_layers(self) -> Any:
        return self.transformer.h  # type: ignore[attr-defined]

    def kv_cache_shape(self) -> tuple[int, int]:
        c = self.config  # type: ignore[attr-defined]
        return int(c.n_head), int(c.n_embd // c.n_head)

    def kv_layer_type(self, i: int) -> str:
        return "full_attention"

    def kv_context(self, input_ids: torch.Tensor, position_ids: torch.Tensor, ctx_len: Any) -> dict[str, Any]:
        return {"position_ids": position_ids, "masks": {"full_attention": causal_mask(position_ids, ctx_len)}}

    def kv_embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        t = self.transformer  # type: ignore[attr-defined]
        return t.wte(input_ids) + t.wpe(position_ids.clamp(min=0))  # [B,S,H]

    def kv_layer(self, i: int, layer: Any, h: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                 past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, k, v = self.kv_attention(i, layer.attn, layer.ln_1(h), ctx, past_k, past_v)
        h = h + attn
        h = h + layer.mlp(layer.ln_2(h))
        return h, k, v

    def kv_attention(self, i: int, attn: Any, x: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                     past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, hidden = x.shape
        heads, d = self.kv_cache_shape()
        q, k, v = attn.c_attn(x).split(hidden, dim=2)  # [B,S,H] each
        scaling = d**-0.5 if attn.scale_attn_weights else 1.0
        if attn.scale_attn_by_inverse_layer_idx:
            scaling /= float(i + 1)
        if self.__dict__.get(FUSED):  # GroupQueryAttention with kv heads = heads, no RoPE
            out, past_k, past_v = self.kv_gqa(ctx, q, k, v, past_k, past_v, (None, None), scaling)
            return attn.c_proj(out), past_k, past_v
        q, k, v = (t.view(b, s, heads, d).transpose(1, 2) for t in (q, k, v))  # [B,heads,S,D]
        past_k, past_v, k_all, v_all = self.kv_update(ctx, past_k, past_v, k, v)  # [B,heads,C,D] each
        out = attend(q, k_all, v_all, ctx["masks"]["full_attention"], scaling, softmax_fp32=False)
        return attn.c_proj(out), past_k, past_v

    def kv_final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(h)  # type: ignore[attr-defined]

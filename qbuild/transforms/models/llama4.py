"""Llama4 text (``Llama4ForCausalLM``, model_type ``llama4_text``) under the retained-state KV cache.

Differences from Llama, each an override below:

* RoPE in real arithmetic: Hugging Face rotates interleaved pairs ``(x[2j], x[2j+1])`` as complex numbers
  (``torch.polar`` / ``view_as_complex``), which neither exporter supports; here the same rotation is
  written with cos/sin on the even and odd lanes.
* NoPE layers (``no_rope_layers[i] == 0``): no RoPE, full causal attention, and query temperature tuning
  ``q *= log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`` at the absolute position.
* RoPE layers use chunked attention (``attention_chunk_size``): a query sees only earlier positions of
  its own chunk; then an L2 norm on q and k when ``use_qk_norm``.
* MoE layers (``moe_layers``): the router keeps the top-k logits, scores them with a sigmoid and scales
  each expert's input by its score; every expert runs densely on every token (unselected experts get
  score 0), so no shape depends on the data; plus the shared expert. Other layers use a dense MLP.
"""

from __future__ import annotations

from typing import Any

import torch

from qbuild.transforms.kv_cache import attend, causal_mask
from qbuild.transforms.models.llama import KVLlama


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., 2j], x[..., 2j+1])`` of ``x [B,S,H,D]`` by angles with ``cos/sin [B,S,1,D/2]``."""
    xf = x.float()
    even, odd = xf[..., 0::2], xf[..., 1::2]  # [B,S,H,D/2]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # [B,S,H,D/2,2]
    return out.flatten(-2).type_as(x)


class KVLlama4(KVLlama):
    kv_family = "llama4"
    kv_fusable = False  # chunked attention: GroupQueryAttention has no chunk mask

    def kv_layer_type(self, i: int) -> str:
        return self.config.layer_types[i]  # type: ignore[attr-defined]

    def kv_masks(self, position_ids: torch.Tensor, ctx_len: Any) -> dict[str, torch.Tensor]:
        chunk = self.config.attention_chunk_size  # type: ignore[attr-defined]
        return {"full_attention": causal_mask(position_ids, ctx_len),
                "chunked_attention": causal_mask(position_ids, ctx_len, chunk=chunk)}

    def kv_prepare(self) -> dict[str, Any]:
        c = self.config  # type: ignore[attr-defined]
        return {"layer_types": list(c.layer_types), "moe_layers": list(c.moe_layers),
                "attention_chunk_size": c.attention_chunk_size}

    def kv_context(self, input_ids: torch.Tensor, position_ids: torch.Tensor, ctx_len: Any) -> dict[str, Any]:
        rotary = self.kv_backbone().rotary_emb
        angles = position_ids[..., None].float() * rotary.inv_freq.float()  # [B,S,D/2]
        cos = (angles.cos() * rotary.attention_scaling)[:, :, None]  # [B,S,1,D/2]
        sin = (angles.sin() * rotary.attention_scaling)[:, :, None]
        return {"position_ids": position_ids, "masks": self.kv_masks(position_ids, ctx_len), "rope": (cos, sin)}

    def kv_layer(self, i: int, layer: Any, h: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                 past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, k, v = self.kv_attention(i, layer.self_attn, layer.input_layernorm(h), ctx, past_k, past_v)
        h = h + attn
        x = layer.post_attention_layernorm(h)
        h = h + (self.kv_moe(layer.feed_forward, x) if layer.is_moe_layer else layer.feed_forward(x))
        return h, k, v

    def kv_attention(self, i: int, attn: Any, x: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                     past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, _ = x.shape
        d = attn.head_dim
        q = attn.q_proj(x).view(b, s, -1, d)  # [B,S,Hq,D]
        k = attn.k_proj(x).view(b, s, -1, d)  # [B,S,Hkv,D]
        v = attn.v_proj(x).view(b, s, -1, d).transpose(1, 2)  # [B,Hkv,S,D]
        if attn.use_rope:
            cos, sin = ctx["rope"]
            q, k = rope_interleaved(q, cos, sin), rope_interleaved(k, cos, sin)
        if hasattr(attn, "qk_norm"):
            q, k = attn.qk_norm(q), attn.qk_norm(k)
        if attn.attn_temperature_tuning and not attn.use_rope:
            pos = ctx["position_ids"].float()[:, :, None, None]  # [B,S,1,1]
            q = (q * (torch.log1p(torch.floor((pos + 1.0) / attn.floor_scale)) * attn.attn_scale + 1.0)).to(q.dtype)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B,H,S,D]
        past_k, past_v, k_all, v_all = self.kv_update(ctx, past_k, past_v, k, v)  # [B,Hkv,C,D] each
        mask = ctx["masks"][self.kv_layer_type(i)]
        out = attend(q, k_all, v_all, mask, attn.scaling, softmax_fp32=False,
                     repeat=self.kv_ops == "qaic")  # [B,S,Hq*D]
        return attn.o_proj(out), past_k, past_v

    def kv_moe(self, moe: Any, x: torch.Tensor) -> torch.Tensor:
        """Top-k sigmoid routing evaluated densely over all experts; ``x [B,S,H]``."""
        b, s, hidden = x.shape
        tokens = x.reshape(-1, hidden)  # [T,H]
        logits = torch.nn.functional.linear(tokens, moe.router.weight)  # [T,E]
        kth = torch.topk(logits, moe.top_k, dim=-1).values[:, -1:]  # [T,1] smallest selected logit
        scores = torch.where(logits >= kth, torch.sigmoid(logits.float()).to(logits.dtype), torch.zeros_like(logits))
        experts = moe.experts
        routed = tokens[None] * scores.transpose(0, 1)[:, :, None]  # [E,T,H] each expert's scaled input
        gate, up = torch.bmm(routed, experts.gate_up_proj).chunk(2, dim=-1)  # [E,T,I] each
        out = torch.bmm(up * experts.act_fn(gate), experts.down_proj).sum(dim=0)  # [T,H]
        return (moe.shared_expert(tokens) + out).view(b, s, hidden)

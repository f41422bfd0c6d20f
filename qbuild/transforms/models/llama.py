"""Llama-style decoders under the retained-state KV cache: Llama, Mistral, Qwen2, Qwen3.

The layer reads as in ``modeling_llama.py``: pre-norm attention with rotate-half RoPE and grouped-query
attention, then a pre-norm gated MLP. The differences handled here:

* Qwen3 normalises q and k per head (``q_norm`` / ``k_norm``) before RoPE;
* Qwen2 has biases on q/k/v (the Linear modules carry them);
* Mistral's ``sliding_window`` (all layers) and Qwen2/Qwen3's ``layer_types`` with
  ``sliding_attention`` restrict a layer's mask to the last ``sliding_window`` positions.

Other families subclass :class:`KVLlama` and override the hooks that differ.
"""

from __future__ import annotations

from typing import Any

import torch

from qbuild.transforms.kv_cache import KVCausalLM, attend, causal_mask


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rotate-half RoPE; ``q [B,H,S,D]``, ``cos/sin [B,S,D]``."""
    cos, sin = cos[:, None], sin[:, None]  # [B,1,S,D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class KVLlama(KVCausalLM):
    """Llama / Mistral / Qwen2 / Qwen3 causal LM with a static KV cache."""

    kv_family = "llama"

    # ----------------------------------------------------------------------------- structure
    def kv_backbone(self) -> Any:
        return self.model  # type: ignore[attr-defined]

    def kv_layers(self) -> Any:
        return self.kv_backbone().layers

    def kv_cache_shape(self) -> tuple[int, int]:
        c = self.config  # type: ignore[attr-defined]
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads), int(head_dim)

    def kv_layer_type(self, i: int) -> str:
        """``full_attention`` or ``sliding_attention`` (Mistral: every layer slides when a window is set)."""
        c = self.config  # type: ignore[attr-defined]
        types = getattr(c, "layer_types", None)
        if types:
            return types[i]
        return "sliding_attention" if getattr(c, "sliding_window", None) else "full_attention"

    def kv_masks(self, position_ids: torch.Tensor, ctx_len: Any) -> dict[str, torch.Tensor]:
        """One mask per layer type present, ``[B,1,S,C]``."""
        window = getattr(self.config, "sliding_window", None)  # type: ignore[attr-defined]
        kinds = {self.kv_layer_type(i) for i in range(self.kv_num_layers())}
        masks = {}
        for kind in kinds:
            masks[kind] = causal_mask(position_ids, ctx_len, window=window if kind == "sliding_attention" else None)
        return masks

    def kv_prepare(self) -> dict[str, Any]:
        kinds = [self.kv_layer_type(i) for i in range(self.kv_num_layers())]
        return {"layer_types": sorted(set(kinds)), "sliding_window": getattr(self.config, "sliding_window", None)}  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------- forward
    def kv_context(self, input_ids: torch.Tensor, position_ids: torch.Tensor, ctx_len: Any) -> dict[str, Any]:
        dummy = torch.empty(0, dtype=self.kv_backbone().embed_tokens.weight.dtype)
        cos, sin = self.kv_backbone().rotary_emb(dummy, position_ids)  # [B,S,D] each
        return {"position_ids": position_ids, "masks": self.kv_masks(position_ids, ctx_len), "rope": (cos, sin)}

    def kv_embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.kv_backbone().embed_tokens(input_ids)

    def kv_layer(self, i: int, layer: Any, h: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                 past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, k, v = self.kv_attention(i, layer.self_attn, layer.input_layernorm(h), ctx, past_k, past_v)
        h = h + attn
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k, v

    def kv_qkv(self, attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections ``[B,H,S,D]``; Qwen3's per-head q/k norms are applied here."""
        b, s, _ = x.shape
        d = self.kv_cache_shape()[1]
        q = attn.q_proj(x).view(b, s, -1, d)  # [B,S,Hq,D]
        k = attn.k_proj(x).view(b, s, -1, d)  # [B,S,Hkv,D]
        v = attn.v_proj(x).view(b, s, -1, d)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def kv_rope(self, i: int, q: torch.Tensor, k: torch.Tensor, ctx: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        cos, sin = ctx["rope"]
        return apply_rope(q, k, cos, sin)

    def kv_attention(self, i: int, attn: Any, x: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                     past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.kv_qkv(attn, x)
        q, k = self.kv_rope(i, q, k, ctx)
        past_k, past_v, k_all, v_all = self.kv_update(ctx, past_k, past_v, k, v)  # [B,Hkv,C,D] each
        mask = ctx["masks"][self.kv_layer_type(i)]
        out = attend(q, k_all, v_all, mask, attn.scaling, softcap=self.kv_softcap(attn),
                     repeat=self.kv_ops == "qaic")  # [B,S,Hq*D]
        return attn.o_proj(out), past_k, past_v

    def kv_softcap(self, attn: Any) -> float | None:
        return None

    def kv_final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.kv_backbone().norm(h)

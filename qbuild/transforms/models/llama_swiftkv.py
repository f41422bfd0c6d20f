"""SwiftKV (qbuild's own ``qbuild/models/llama_swiftkv.py``, model_type ``llama_swiftkv``) under the
retained-state KV cache, as QEfficient's ``QEffLlamaSwiftKVModel.forward`` (reference qefficient-modes.md 3.4).

The graph's inputs and outputs are every causal LM's (``past_key.{i}``/``past_value.{i}`` for **all** layers);
one graph serves prefill and decode. With ``n = num_key_value_layers``:

1. layers ``0..n-1`` run as :class:`KVLlama` layers on every token (cache write, attention, MLP);
2. ``x = norm_swiftkv(h)``; for every later layer, ``k = rope(k_proj_swiftkv(x))`` and ``v = v_proj_swiftkv(x)``
   are written into its cache at the tokens' positions (every token; a group of ``key_value_group_size`` layers
   shares its leader's k/v, each layer keeping its own cache) through the same :meth:`kv_update` hook as the
   other families, so the ``qaic`` form writes and reads them with CtxScatter / CtxGather;
3. only each row's last valid token (``argmax(position_ids)``) goes on: the later layers' query
   (``q_proj_swiftkv``, RoPE at that token's position), attention over its cache, ``o_proj``, MLP; then the
   final norm and the head. Prefill thus runs the later layers for one token per row.

With ``compile.qaic.use_onnx_subfunctions`` the plain layers are calls of the one layer function; the SwiftKV
layers stay inline in the graph (their cache fill and last-token part are separate steps, not one layer call).
"""

from __future__ import annotations

from typing import Any

import torch

from qbuild.transforms.kv_cache import KVLayerFunction, attend, last_valid
from qbuild.transforms.models.llama import KVLlama, rotate_half


def rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on one tensor ``x [B,H,S,D]`` with ``cos, sin [B,S,D]``."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class KVLlamaSwiftKV(KVLlama):
    kv_family = "llama_swiftkv"
    kv_fusable = False  # later layers read caches another layer wrote

    def kv_layer_type(self, i: int) -> str:
        return "full_attention"

    def kv_prepare(self) -> dict[str, Any]:
        c = self.config  # type: ignore[attr-defined]
        return {"num_key_value_layers": c.num_key_value_layers, "key_value_group_size": c.key_value_group_size}

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor,
                **named: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past_kv = self.kv_collect(past, named)
        position_ids = position_ids.to(torch.int64)
        ctx = self.kv_context(input_ids, position_ids, past_kv[0].shape[2])
        h = self.kv_embed(input_ids, position_ids)  # [B,S,H]
        n = self.config.num_key_value_layers  # type: ignore[attr-defined]
        layers = self.kv_layers()
        new: list[torch.Tensor] = []
        for i in range(n):  # plain Llama layers on every token
            if isinstance(layers[i], KVLayerFunction):  # an export with ONNX subfunctions
                h, k, v = layers[i](h, ctx, past_kv[2 * i], past_kv[2 * i + 1])
            else:
                h, k, v = self.kv_layer(i, layers[i], h, ctx, past_kv[2 * i], past_kv[2 * i + 1])
            new += [k, v]
        reads = self.kv_swiftkv_fill(self.kv_backbone().norm_swiftkv(h), ctx, past_kv[2 * n:], new)
        h = last_valid(h, position_ids)  # [B,1,H]: the later layers run for each row's last valid token
        last_ctx = self.kv_last_context(position_ids, past_kv[0].shape[2])
        for j, layer in enumerate(layers[n:]):
            h = self.kv_swiftkv_layer(layer, h, last_ctx, *reads[j])
        logits = self.kv_logits(self.kv_final_norm(h)).float()  # [B,1,V]
        return (logits, *new)

    def kv_swiftkv_fill(self, x: torch.Tensor, ctx: dict[str, Any], past: list[torch.Tensor],
                        new: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Write every later layer's k/v from ``x = norm_swiftkv(h) [B,S,H]`` into its cache (appended to
        ``new``); returns what each layer's attention reads, ``(k, v) [B,Hkv,C,D]``."""
        b, s, _ = x.shape
        d = self.kv_cache_shape()[1]
        reads: list[tuple[torch.Tensor, torch.Tensor]] = []
        k = v = None
        for j, layer in enumerate(self.kv_layers()[self.config.num_key_value_layers:]):  # type: ignore[attr-defined]
            attn = layer.self_attn
            if hasattr(attn, "k_proj_swiftkv"):  # the group's leader; the others reuse its k, v
                k = rope_one(attn.k_proj_swiftkv(x).view(b, s, -1, d).transpose(1, 2), *ctx["rope"])  # [B,Hkv,S,D]
                v = attn.v_proj_swiftkv(x).view(b, s, -1, d).transpose(1, 2)
            past_k, past_v, k_all, v_all = self.kv_update(ctx, past[2 * j], past[2 * j + 1], k, v)
            new += [past_k, past_v]
            reads.append((k_all, v_all))
        return reads

    def kv_last_context(self, position_ids: torch.Tensor, ctx_len: Any) -> dict[str, Any]:
        """Mask ``[B,1,1,C]`` and rope ``[B,1,D]`` of each row's last valid token (its largest position id)."""
        last = position_ids.max(dim=1, keepdim=True).values  # [B,1]
        dummy = torch.empty(0, dtype=self.kv_backbone().embed_tokens.weight.dtype)
        return {"position_ids": last, "masks": self.kv_masks(last, ctx_len),
                "rope": self.kv_backbone().rotary_emb(dummy, last)}

    def kv_swiftkv_layer(self, layer: Any, h: torch.Tensor, ctx: dict[str, Any], k_all: torch.Tensor,
                         v_all: torch.Tensor) -> torch.Tensor:
        """A later layer on ``h [B,1,H]``: query from ``q_proj_swiftkv``, attention over its cache, MLP."""
        attn = layer.self_attn
        b, t, _ = h.shape
        q = attn.q_proj_swiftkv(layer.input_layernorm(h)).view(b, t, -1, attn.head_dim).transpose(1, 2)  # [B,Hq,1,D]
        q = rope_one(q, *ctx["rope"])
        out = attend(q, k_all, v_all, ctx["masks"]["full_attention"], attn.scaling,
                     repeat=self.kv_ops == "qaic")  # [B,1,Hq*D]
        h = h + attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

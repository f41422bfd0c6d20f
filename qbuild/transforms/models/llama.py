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

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from qbuild.transforms.kv_cache import KVCausalLM, attend, causal_mask, fold_mask

#: ``graph_form("fused")``: the attribute a :class:`KVLlama` holds while its attention exports as one
#: ``com.microsoft::GroupQueryAttention`` node a layer (:func:`fused_attention`)
FUSED = "kv_fused"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


#: RoPE types whose cos/sin at a position never change (``dynamic`` and ``longrope`` rescale with the length
#: seen): only these are tabulated for ONNX Runtime's RotaryEmbedding
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
ROPE_TABLES = ("kv_rope_cos", "kv_rope_sin")
#: the two tables together at most this large (Llama 3.1's 131072 positions x 64 x 2 x fp32 is 64 MiB); a model
#: with more positions (Qwen2.5-1M: 0.5 GB of tables) keeps the plain ops
ROPE_TABLE_MAX_BYTES = 64 << 20


class OrtRotary(torch.autograd.Function):
    """Rotate-half RoPE of ``x [B,H,S,D]`` at positions ``pos [B,S]`` (clamped to >= 0) from the tables
    ``cos, sin [P, D/2]``: one ``com.microsoft::RotaryEmbedding`` node in a legacy export instead of the
    Slice/Neg/Concat/Mul/Add of :func:`rotate_half`; the same arithmetic when run eagerly."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,  # noqa: ANN401
                sin: torch.Tensor) -> torch.Tensor:
        c, s = cos[pos][:, None], sin[pos][:, None]  # [B,1,S,D/2]
        return x * torch.cat((c, c), -1) + rotate_half(x) * torch.cat((s, s), -1)

    @staticmethod
    def symbolic(g: Any, x: Any, pos: Any, cos: Any, sin: Any) -> Any:
        out = g.op("com.microsoft::RotaryEmbedding", x, pos, cos, sin, interleaved_i=0)
        out.setType(x.type())
        return out


@contextlib.contextmanager
def rope_tables(model: Any) -> Iterator[bool]:
    """For the time of the block, a :class:`KVLlama` with a static RoPE holds its cos/sin for every position
    (``[max_position_embeddings, head_dim / 2]`` buffers; the exported graph's initializers) and a legacy export
    rotates q and k with ONNX Runtime's RotaryEmbedding (:class:`OrtRotary`): 2 nodes a layer instead of 14.
    Yields whether it applies: other families, a RoPE that changes with the length, bfloat16 (no ORT kernel) and
    tables above :data:`ROPE_TABLE_MAX_BYTES` keep the plain ops."""
    cls = type(model)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    applies = (isinstance(model, KVLlama) and cls.kv_context is KVLlama.kv_context
               and cls.kv_rope is KVLlama.kv_rope and getattr(rotary, "rope_type", None) in STATIC_ROPE)
    dtype = model.kv_backbone().embed_tokens.weight.dtype if applies else None
    applies = applies and dtype in (torch.float32, torch.float16)  # ONNX Runtime's CPU kernel's types
    if applies:
        positions = int(model.config.max_position_embeddings)
        head_dim = model.kv_cache_shape()[1]
        applies = positions * head_dim * torch.finfo(dtype).bits // 8 <= ROPE_TABLE_MAX_BYTES  # 2 x P x D/2
    if applies:
        dummy = torch.empty(0, dtype=dtype)  # the tables in the model's dtype, as the forward computes them
        with torch.no_grad():
            cos, sin = rotary(dummy, torch.arange(positions)[None])  # [1,P,D]
        half = cos.shape[-1] // 2
        applies = bool(torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:]))
    if not applies:
        yield False
        return
    for name, table in zip(ROPE_TABLES, (cos, sin), strict=True):
        model.register_buffer(name, table[0, :, :half].contiguous(), persistent=False)
    try:
        yield True
    finally:
        for name in ROPE_TABLES:
            delattr(model, name)


def gqa_slots(position_ids: torch.Tensor, ctx_len: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``seqlens_k [B]`` and ``total_sequence_length`` (0-d), int32, of GroupQueryAttention for ``position_ids
    [B,S]`` under the fused form's contract: a row's valid tokens come first, at consecutive positions from
    ``position_ids[b, 0]``, and its padding is written at the slots that follow (it keeps counting); a row that
    is all padding writes the last ``S`` slots. The kernel writes token ``s`` of row ``b`` at slot
    ``seqlens_k[b] + 1 - S + s`` and lets it see slots up to there."""
    s = position_ids.shape[1]
    first = position_ids[:, 0]
    seqlens = torch.where(first >= 0, first + (s - 1), torch.full_like(first, ctx_len - 1)).to(torch.int32)
    return seqlens, seqlens.max() + 1


def gqa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                  seqlens_k: torch.Tensor, scale: float, window: int | None = None,
                  rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                  softcap: float | None = None) -> tuple[torch.Tensor, ...]:
    """What ``com.microsoft::GroupQueryAttention`` computes (past and present sharing the cache): ``q [B,S,Hq*D]``,
    ``k, v [B,S,Hkv*D]`` written into ``past_k, past_v [B,Hkv,C,D]`` at the slots :func:`gqa_slots` describes,
    causal attention over the slots up to each token's (the last ``window`` only, when given); ``rope``: cos, sin
    tables ``[P, D/2]`` applied (rotate-half) to q and k at those slots first; ``softcap``: scaled scores
    soft-capped (``softcap * tanh(s / softcap)``). Returns ``[B,S,Hq*D]`` and the caches."""
    b, s, _ = q.shape
    hkv, ctx_len, d = past_k.shape[1:]
    slots = seqlens_k.to(torch.int64)[:, None] + 1 - s + torch.arange(s)[None]  # [B,S]
    q, k, v = (t.reshape(b, s, -1, d).transpose(1, 2) for t in (q, k, v))  # [B,H,S,D]
    if rope is not None:
        cos, sin = (torch.cat((t[slots], t[slots]), -1)[:, None] for t in rope)  # [B,1,S,D]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    index = slots[:, None, :, None].expand(b, hkv, s, d)
    past_k, past_v = past_k.scatter(2, index, k), past_v.scatter(2, index, v)
    out = attend(q, past_k, past_v, causal_mask(slots, ctx_len, window=window), scale, softcap=softcap)
    return out, past_k, past_v


class OrtGroupQueryAttention(torch.autograd.Function):
    """:func:`gqa_reference` run eagerly; one ``com.microsoft::GroupQueryAttention`` node in a legacy export."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,  # noqa: ANN401
                past_v: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor, cos: torch.Tensor | None,
                sin: torch.Tensor | None, heads: int, kv_heads: int, scale: float, window: int | None,
                softcap: float | None = None) -> tuple[torch.Tensor, ...]:
        return gqa_reference(q, k, v, past_k, past_v, seqlens_k, scale, window, None if cos is None else (cos, sin),
                             softcap)

    @staticmethod
    def symbolic(g: Any, q: Any, k: Any, v: Any, past_k: Any, past_v: Any, seqlens_k: Any, total: Any,
                 cos: Any, sin: Any, heads: int, kv_heads: int, scale: float, window: int | None,
                 softcap: float | None = None) -> Any:
        attrs: dict[str, Any] = {"num_heads_i": heads, "kv_num_heads_i": kv_heads, "scale_f": scale}
        inputs = [q, k, v, past_k, past_v, seqlens_k, total]
        if cos is not None and not (hasattr(cos, "node") and cos.node().mustBeNone()):
            inputs += [cos, sin]
            attrs.update(do_rotary_i=1, rotary_interleaved_i=0)
        if window is not None:
            attrs["local_window_size_i"] = window
        if softcap is not None:
            attrs["softcap_f"] = softcap
        out, pk, pv = g.op("com.microsoft::GroupQueryAttention", *inputs, outputs=3, **attrs)
        out.setType(q.type())
        pk.setType(past_k.type())
        pv.setType(past_v.type())
        return out, pk, pv


@contextlib.contextmanager
def fused_attention(model: Any) -> Iterator[str | None]:
    """For the time of the block, a :class:`KVLlama` whose family allows it (``kv_fusable``: Llama, Mistral, Qwen2,
    Qwen3, Gemma 3 text, Grok-1, GPT-2) exports its attention (cache write + grouped-query attention with its
    window and soft cap, and RoPE when :func:`rope_tables` holds the tables) as ONNX Runtime's
    ``GroupQueryAttention``, under :func:`gqa_slots`'s contract on padding. Yields None when it applies, else
    why not (the model keeps the plain ops): Llama 4 (chunked attention) and SwiftKV (its later layers read
    caches another layer wrote) say ``kv_fusable = False``; GPT-2 (no RoPE, kv heads = heads) handles it in its
    own attention."""
    cls = type(model)
    why = None
    kinds = {model.kv_layer_type(i) for i in range(model.kv_num_layers())} if isinstance(model, KVLlama) else set()
    if not getattr(cls, "kv_fusable", False) or not kinds <= {"full_attention", "sliding_attention"}:
        why = f"the {getattr(cls, 'kv_family', cls.__name__)} family keeps its own attention ops"
    elif next(model.parameters()).dtype not in (torch.float32, torch.float16):
        why = "ONNX Runtime's GroupQueryAttention runs float32 and float16 only"
    if why:
        yield why
        return
    setattr(model, FUSED, True)
    try:
        yield None
    finally:
        delattr(model, FUSED)


def rotary_inside(model: Any) -> bool:
    """Whether GroupQueryAttention can do the RoPE itself (its CPU kernel's rotary needs a head size that is a
    multiple of 16); else it is done before, as in the plain form."""
    return model.kv_cache_shape()[1] % 16 == 0


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rotate-half RoPE; ``q [B,H,S,D]``, ``cos/sin [B,S,D]``."""
    cos, sin = cos[:, None], sin[:, None]  # [B,1,S,D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class KVLlama(KVCausalLM):
    """Llama / Mistral / Qwen2 / Qwen3 causal LM with a static KV cache."""

    kv_family = "llama"
    #: the attention may export as GroupQueryAttention (:func:`fused_attention`); a family whose attention differs
    #: in a way the kernel cannot express sets it False
    kv_fusable = True

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
        ctx = {"position_ids": position_ids, "masks": self.kv_masks(position_ids, ctx_len), "rope": (cos, sin)}
        if torch.jit.is_tracing() and ROPE_TABLES[0] in self._buffers:  # type: ignore[attr-defined]
            # a legacy export inside rope_tables(): kv_rope's RotaryEmbedding reads the tables (a padding position
            # -1 reads row 0: its values are never seen, module doc of kv_cache); "rope" stays for code that reads
            # it directly (SwiftKV), else the exporter drops its nodes
            ctx["rope_table"] = (position_ids.clamp(min=0), *(getattr(self, n) for n in ROPE_TABLES))
        return ctx

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
        if "rope_table" in ctx:
            pos, cos_t, sin_t = ctx["rope_table"]
            return OrtRotary.apply(q, pos, cos_t, sin_t), OrtRotary.apply(k, pos, cos_t, sin_t)
        cos, sin = ctx["rope"]
        return apply_rope(q, k, cos, sin)

    def kv_attention(self, i: int, attn: Any, x: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                     past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.__dict__.get(FUSED):
            return self.kv_fused_attention(i, attn, x, ctx, past_k, past_v)
        q, k, v = self.kv_qkv(attn, x)
        q, k = self.kv_rope(i, q, k, ctx)
        past_k, past_v, k_all, v_all = self.kv_update(ctx, past_k, past_v, k, v)  # [B,Hkv,C,D] each
        kind = self.kv_layer_type(i)
        mask, repeat = ctx["masks"][kind], self.kv_ops == "qaic"
        groups = self.config.num_attention_heads // self.kv_cache_shape()[0]  # type: ignore[attr-defined]
        out = attend(q, k_all, v_all, mask, attn.scaling, softcap=self.kv_softcap(attn), repeat=repeat,
                     folded_mask=None if repeat else fold_mask(ctx, kind, mask, groups))  # [B,S,Hq*D]
        return attn.o_proj(out), past_k, past_v

    def kv_fused_attention(self, i: int, attn: Any, x: torch.Tensor, ctx: dict[str, Any], past_k: torch.Tensor,
                           past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`kv_attention` as one GroupQueryAttention (:func:`fused_attention`): the projections go in, RoPE
        is done inside when the tables are held (else here), and the caches are written in place."""
        b, s, _ = x.shape
        inside = "rope_table" in ctx and rotary_inside(self)
        tables: tuple[Any, Any] = ctx["rope_table"][1:] if inside else (None, None)
        if tables[0] is not None and not hasattr(attn, "q_norm"):
            q, k, v = (proj(x) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # [B,S,H*D]
        else:
            q, k, v = self.kv_qkv(attn, x)  # [B,H,S,D], Qwen3's norms applied
            if tables[0] is None:
                q, k = self.kv_rope(i, q, k, ctx)
            q, k, v = (t.transpose(1, 2).reshape(b, s, -1) for t in (q, k, v))
        sliding = self.kv_layer_type(i) == "sliding_attention"
        window = getattr(self.config, "sliding_window", None) if sliding else None  # type: ignore[attr-defined]
        softcap = self.kv_softcap(attn)
        out, past_k, past_v = self.kv_gqa(ctx, q, k, v, past_k, past_v, tables, float(attn.scaling), window,
                                          None if softcap is None else float(softcap))
        return attn.o_proj(out), past_k, past_v

    def kv_gqa(self, ctx: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
               past_v: torch.Tensor, tables: tuple[Any, Any], scale: float, window: int | None = None,
               softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:class:`OrtGroupQueryAttention` of ``q, k, v [B,S,H*D]`` over the caches (slots once per forward)."""
        if "gqa" not in ctx:  # every family's context has the position ids
            ctx["gqa"] = gqa_slots(ctx["position_ids"], past_k.shape[2])
        heads = int(self.config.num_attention_heads)  # type: ignore[attr-defined]
        return OrtGroupQueryAttention.apply(q, k, v, past_k, past_v, *ctx["gqa"], *tables, heads,
                                            self.kv_cache_shape()[0], scale, window, softcap)

    def kv_softcap(self, attn: Any) -> float | None:
        return None

    def kv_final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.kv_backbone().norm(h)

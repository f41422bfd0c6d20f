"""SwiftKV (Snowflake's Llama variant, QEfficient's ``llama_swiftkv``) as transformers classes.

transformers has no SwiftKV; QEfficient registers its own module (reference qefficient-modes.md 3). This module
re-implements it on transformers 5.24's Llama parts, eager attention only, with the checkpoint's config keys
(``llama_swiftkv_config.LlamaSwiftKVConfig``) and weight names. With ``n = num_key_value_layers``::

    h      = layers[0..n-1](embed(ids))                 # plain Llama layers, every token, own q/k/v
    x      = norm_swiftkv(h)                            # [B, S, H]
    K_l    = rope(k_proj_swiftkv(x)), V_l = v_proj_swiftkv(x)   # every later layer l, every token, one shot
    h_last = layers[n..L-1](h[:, -t:], K, V)            # q_proj_swiftkv, o_proj, MLP on the last t tokens
    logits = lm_head(norm(h_last))

Later layers have ``self_attn.{q,k,v}_proj_swiftkv`` and ``o_proj`` (no ``q/k/v_proj``: a checkpoint's are
ignored); with ``key_value_group_size`` g > 1 only the first layer of each group of g later layers has
``k_proj_swiftkv``/``v_proj_swiftkv`` and the group shares them (Snowflake's ArcticTraining; each layer still
keeps its own cache). ``t`` is ``logits_to_keep`` when it is a positive int (``generate`` passes 1: the later
layers run for the last token only), else every token. Causal attention and the per-token MLP make the last
``t`` rows the same either way.

Call ``register()`` before ``AutoConfig.for_model("llama_swiftkv")`` or ``AutoModelForCausalLM.from_pretrained``.
Importing this module imports torch and transformers: import it only inside a stage's ``run()``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)
from transformers.utils.deprecation import deprecate_kwarg

from qbuild.models.llama_swiftkv_config import LlamaSwiftKVConfig

__all__ = ["LlamaSwiftKVConfig", "LlamaSwiftKVForCausalLM", "LlamaSwiftKVModel", "LlamaSwiftKVPreTrainedModel",
           "register"]


def rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on one tensor ``x [B, h, S, D]`` with ``cos, sin [B, S, D]``."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, D]
    return x * cos + rotate_half(x) * sin


def is_group_leader(config: LlamaSwiftKVConfig, layer_idx: int) -> bool:
    """Whether later layer ``layer_idx`` owns ``k_proj_swiftkv``/``v_proj_swiftkv`` (first of its group)."""
    return (layer_idx - config.num_key_value_layers) % config.key_value_group_size == 0


class LlamaSwiftKVAttention(nn.Module):
    """A later layer's attention: the query from ``q_proj_swiftkv`` of its own input, keys and values given."""

    def __init__(self, config: LlamaSwiftKVConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        q, kv = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj_swiftkv = nn.Linear(hidden, q, bias=bias)
        if is_group_leader(config, layer_idx):
            self.k_proj_swiftkv = nn.Linear(hidden, kv, bias=bias)
            self.v_proj_swiftkv = nn.Linear(hidden, kv, bias=bias)
        self.o_proj = nn.Linear(q, hidden, bias=bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``hidden_states [B, T, H]`` (T kept tokens) over ``key, value [B, Hkv, K, D]``; returns ``[B, T, H]``."""
        b, t, _ = hidden_states.shape
        q = self.q_proj_swiftkv(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        q = rope_one(q, *position_embeddings)
        out, _ = eager_attention_forward(self, q, key, value, attention_mask, self.scaling)  # [B, T, Hq, D]
        return self.o_proj(out.reshape(b, t, -1))


class LlamaSwiftKVDecoderLayer(nn.Module):
    """A later layer: pre-norm SwiftKV attention and pre-norm Llama MLP, each with a residual."""

    def __init__(self, config: LlamaSwiftKVConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaSwiftKVAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, key, value)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaSwiftKVPreTrainedModel(PreTrainedModel):
    config_class = LlamaSwiftKVConfig
    base_model_prefix = "model"
    _no_split_modules = ["LlamaDecoderLayer", "LlamaSwiftKVDecoderLayer"]
    _supports_flash_attn = False
    _supports_sdpa = False
    _supports_flex_attn = False


class LlamaSwiftKVModel(LlamaSwiftKVPreTrainedModel):
    """Embeddings, ``num_key_value_layers`` Llama layers, ``norm_swiftkv``, the SwiftKV layers, final norm."""

    def __init__(self, config: LlamaSwiftKVConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        n = config.num_key_value_layers
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) if i < n else LlamaSwiftKVDecoderLayer(config, i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_swiftkv = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def swiftkv_keys_values(self, x: torch.Tensor,
                            rope: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Keys (RoPE applied) and values ``[B, Hkv, S, D]`` of every later layer from ``x = norm_swiftkv(h)``;
        layers of one group share their leader's."""
        b, s, _ = x.shape
        out: list[tuple[torch.Tensor, ...]] = []
        for layer in self.layers[self.config.num_key_value_layers:]:
            attn = layer.self_attn
            if not is_group_leader(self.config, attn.layer_idx):
                out.append(out[-1])
                continue
            k = attn.k_proj_swiftkv(x).view(b, s, -1, attn.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
            v = attn.v_proj_swiftkv(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
            out.append((rope_one(k, *rope), v))
        return out

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_last_tokens: int = 0,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``last_hidden_state`` is ``[B, t, H]``: the last ``num_last_tokens`` positions (all when 0)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        cache = cache if use_cache else None
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids, allow_is_causal_skip=False)
        rope = self.rotary_emb(inputs_embeds, position_ids=position_ids)  # cos, sin [B, S, D]
        n = self.config.num_key_value_layers
        h = inputs_embeds
        for layer in self.layers[:n]:
            h = layer(h, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
                      position_embeddings=rope)
        if n < len(self.layers):
            h = self._swiftkv_layers(h, rope, mask, cache, num_last_tokens)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache)

    def _swiftkv_layers(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                        cache: Cache | None, num_last_tokens: int) -> torch.Tensor:
        """Fill the later layers' caches from ``norm_swiftkv(h)`` (every token), then run them on the last t."""
        kv = self.swiftkv_keys_values(self.norm_swiftkv(h), rope)
        t = h.shape[1] if num_last_tokens <= 0 else min(num_last_tokens, h.shape[1])
        h, rope_t = h[:, -t:], (rope[0][:, -t:], rope[1][:, -t:])  # [B, t, H]
        mask_t = mask[:, :, -t:] if mask is not None else None  # [B, 1, t, K]
        n = self.config.num_key_value_layers
        for j, layer in enumerate(self.layers[n:]):
            k, v = kv[j]
            if cache is not None:
                k, v = cache.update(k, v, n + j)  # [B, Hkv, past + S, D]
            h = layer(h, rope_t, mask_t, k, v)
        return h


class LlamaSwiftKVForCausalLM(LlamaSwiftKVPreTrainedModel, GenerationMixin):
    """LlamaSwiftKVModel + ``lm_head``; the class name is the checkpoint's ``architectures`` entry."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # tied only if tie_word_embeddings

    def __init__(self, config: LlamaSwiftKVConfig) -> None:
        super().__init__(config)
        self.model = LlamaSwiftKVModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``[B, S or logits_to_keep, vocab]``; a positive int ``logits_to_keep`` (``generate``: 1) runs the
        SwiftKV layers on that many last tokens only."""
        keep = logits_to_keep if isinstance(logits_to_keep, int) and labels is None else 0
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, num_last_tokens=keep)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` resolve ``llama_swiftkv``. Idempotent."""
    AutoConfig.register(LlamaSwiftKVConfig.model_type, LlamaSwiftKVConfig, exist_ok=True)
    AutoModel.register(LlamaSwiftKVConfig, LlamaSwiftKVModel, exist_ok=True)
    AutoModelForCausalLM.register(LlamaSwiftKVConfig, LlamaSwiftKVForCausalLM, exist_ok=True)

"""Grok-1 (xAI, 314B MoE) as transformers classes, written from the public PyTorch port's architecture.

transformers has no Grok-1; the public checkpoint ``hpcai-tech/grok-1`` ships remote code. This module
re-implements it with the checkpoint's config keys (``grok1_config.Grok1Config``) and weight names
(``model.layers.N.attn.q_proj``, ``.moe_block.experts.E.linear_v``, ``.pre_attn_norm.scale``, ...), on
transformers 5.24's Cache API, eager attention only. Per decoder layer ("sandwich" norms)::

    h   = x + post_attn_norm(attn(pre_attn_norm(x)))
    out = h + post_moe_norm(moe(pre_moe_norm(h)))

Call ``register()`` before ``AutoConfig.for_model("grok-1")`` or ``AutoModelForCausalLM.from_pretrained``.
Importing this module imports torch and transformers: import it only inside a stage's ``run()``.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg

from qbuild.models.grok1_config import Grok1Config

__all__ = ["Grok1Config", "Grok1ForCausalLM", "Grok1Model", "Grok1ModelForCausalLM", "Grok1PreTrainedModel",
           "checkpoint_config", "register"]

ROPE_THETA = 10000.0  # the checkpoint's config has no rope key; its code hard-codes base 10000


class Grok1RMSNorm(nn.Module):
    """RMSNorm computed in fp32, times the parameter ``scale`` (no +1 offset), cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.scale.to(torch.float32) * x).to(input_dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[batch, seq, head_dim]`` for rotate-half RoPE (base 10000) at ``position_ids [batch, seq]``."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, kv_heads, S, D]`` -> ``[B, kv_heads * n_rep, S, D]`` (each KV head serves n_rep query heads)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Grok1Attention(nn.Module):
    """GQA attention; scores ``(q k^T).float() * attn_output_multiplier`` soft-capped at ``max_attn_value``."""

    def __init__(self, config: Grok1Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.attn_output_multiplier = config.attn_output_multiplier
        self.max_attn_value = config.max_attn_value
        hidden, kv = config.hidden_size, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv, bias=False)
        self.v_proj = nn.Linear(hidden, kv, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the attention output ``[B, S, hidden]`` and the probabilities ``[B, heads, S, kv_len]``."""
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(hidden_states).view(b, s, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, s, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # [B, 1, S, D]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, KV, past + S, D]
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)

        scores = torch.matmul(q, k.transpose(2, 3)).float() * self.attn_output_multiplier  # [B, H, S, T]
        scores = self.max_attn_value * torch.tanh(scores / self.max_attn_value)  # softcap to (-cap, cap)
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : k.shape[-2]]  # additive: 0 or dtype min
        probs = F.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out), probs


class Grok1Expert(nn.Module):
    """Gated-GELU MLP: ``linear_1(GELU(linear(x)) * linear_v(x))`` with exact (erf) GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.linear_v = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.linear_1 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.linear = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(self.act_fn(self.linear(x)) * self.linear_v(x))


class Grok1MoeBlock(nn.Module):
    """Router softmax over all experts (fp32), top-k; the k probabilities weight the experts as they are
    (no renormalisation, so they sum to less than 1). Tokens go only to their selected experts."""

    def __init__(self, config: Grok1Config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [Grok1Expert(config.hidden_size, config.intermediate_size) for _ in range(config.num_experts)]
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output ``[B, S, hidden]`` and the router logits ``[B*S, experts]``."""
        b, s, d = hidden_states.shape
        x = hidden_states.reshape(-1, d)  # [T, D]
        router_logits = self.gate(x)  # [T, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)  # [T, K] each
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(selected == e)  # tokens routed to expert e, and in which of the k slots
            if token_idx.numel() == 0:
                continue
            out.index_add_(0, token_idx, expert(x[token_idx]) * weights[token_idx, slot, None])
        return out.view(b, s, d), router_logits


class Grok1DecoderLayer(nn.Module):
    """Attention and MoE, each between a pre- and a post-RMSNorm, each with a residual."""

    def __init__(self, config: Grok1Config, layer_idx: int) -> None:
        super().__init__()
        self.attn = Grok1Attention(config, layer_idx)
        self.moe_block = Grok1MoeBlock(config)
        eps = config.rms_norm_eps
        self.pre_attn_norm = Grok1RMSNorm(config.hidden_size, eps)
        self.post_attn_norm = Grok1RMSNorm(config.hidden_size, eps)
        self.pre_moe_norm = Grok1RMSNorm(config.hidden_size, eps)
        self.post_moe_norm = Grok1RMSNorm(config.hidden_size, eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _ = self.attn(self.pre_attn_norm(hidden_states), position_embeddings, attention_mask, cache)
        hidden_states = hidden_states + self.post_attn_norm(attn_out)
        moe_out, _ = self.moe_block(self.pre_moe_norm(hidden_states))
        return hidden_states + self.post_moe_norm(moe_out)


class Grok1PreTrainedModel(PreTrainedModel):
    config_class = Grok1Config
    base_model_prefix = "model"
    _no_split_modules = ["Grok1DecoderLayer"]
    _supports_flash_attn = False
    _supports_sdpa = False
    _supports_flex_attn = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear / Embedding: normal(0, initializer_range or 0.02)
        if isinstance(module, Grok1RMSNorm):  # the checkpoint's code starts at zeros; ones keeps a random model alive
            init.ones_(module.scale)


class Grok1Model(Grok1PreTrainedModel):
    """Embeddings (times ``embedding_multiplier_scale``), decoder layers, final RMSNorm."""

    def __init__(self, config: Grok1Config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([Grok1DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Grok1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:  # as the checkpoint's code: the multiplier applies to looked-up embeddings only
            inputs_embeds = self.embed_tokens(input_ids) * self.config.embedding_multiplier_scale
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)

        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids, allow_is_causal_skip=False)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        position_embeddings = rope_cos_sin(position_ids, head_dim, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, cache if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)


class Grok1ModelForCausalLM(Grok1PreTrainedModel, GenerationMixin):
    """Grok1Model + ``lm_head`` (no bias, tied to the embeddings); logits times ``output_multiplier_scale``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Grok1Config) -> None:
        super().__init__(config)
        self.model = Grok1Model(config)
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
        """Logits ``[B, S or logits_to_keep, vocab]`` in fp32; ``cache`` is the updated DynamicCache."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = (self.lm_head(hidden_states) * self.config.output_multiplier_scale).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


#: the name our code reads best as; the class is named as the checkpoint's ``architectures`` entry
Grok1ForCausalLM = Grok1ModelForCausalLM


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` resolve model type ``grok-1``. Idempotent."""
    AutoConfig.register(Grok1Config.model_type, Grok1Config, exist_ok=True)
    AutoModel.register(Grok1Config, Grok1Model, exist_ok=True)
    AutoModelForCausalLM.register(Grok1Config, Grok1ModelForCausalLM, exist_ok=True)


def checkpoint_config(model_dir: str | Path) -> Grok1Config | None:
    """The Grok1Config of a checkpoint directory whose config.json is Grok-1's, else None.

    The public config.json names its remote code in ``auto_map`` and may carry no ``model_type``; transformers
    then asks for ``trust_remote_code``. Passing this config to ``from_pretrained(..., config=...)`` loads our
    registered classes instead, without running the checkpoint's code.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    auto_config = str((data.get("auto_map") or {}).get("AutoConfig", ""))
    if (data.get("model_type") == Grok1Config.model_type or auto_config.endswith(".Grok1Config")
            or "Grok1ModelForCausalLM" in (data.get("architectures") or [])):
        return Grok1Config.from_pretrained(model_dir)
    return None

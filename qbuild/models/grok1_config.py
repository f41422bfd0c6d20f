"""Grok-1 configuration: the keys and defaults of the public checkpoint ``hpcai-tech/grok-1``.

transformers ships no Grok-1. The defaults below are the checkpoint's ``config.json`` (model type
``grok-1``, 314B parameters); ``qbuild.models.grok1.register()`` makes ``AutoConfig`` resolve it.
Importing this module imports transformers (and torch): import it only where a stage runs.
"""

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

__all__ = ["Grok1Config"]


@strict
class Grok1Config(PretrainedConfig):
    """Grok-1 hyper-parameters; field names and defaults as in the public checkpoint's config.json."""

    model_type = "grok-1"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 131072
    hidden_size: int = 6144
    intermediate_size: int = 32768  # per-expert FFN width
    num_hidden_layers: int = 64
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 8  # GQA: head_dim = hidden_size // num_attention_heads = 128
    attn_output_multiplier: int | float = 0.08838834764831845  # 1/sqrt(head_dim): the only score scaling
    max_attn_value: int | float = 30.0  # attention logit softcap: cap * tanh(scores / cap)
    max_position_embeddings: int = 8192
    embedding_multiplier_scale: int | float = 78.38367176906169  # sqrt(hidden_size), applied to token embeddings
    output_multiplier_scale: int | float = 0.5773502691896257  # 1/sqrt(3), applied to the logits
    rms_norm_eps: int | float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    num_experts_per_tok: int = 2
    num_experts: int = 8
    output_router_logits: bool = False
    router_aux_loss_coef: int | float = 0.001

    def __post_init__(self, **kwargs) -> None:
        if self.num_key_value_heads is None:  # as the checkpoint's code: MHA when unset
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Head counts must divide the hidden size and each other (GQA groups)."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}")

"""SwiftKV configuration: Llama's keys plus the three of ``Snowflake/Llama-3.1-SwiftKV-8B-Instruct``.

transformers ships no SwiftKV. QEfficient registers ``QEffLlamaSwiftKVConfig(LlamaConfig)`` under model type
``llama_swiftkv`` with ``swiftkv``, ``num_key_value_layers`` and ``key_value_group_size`` (reference
qefficient-modes.md 3.2); this class has the same keys and defaults. ``qbuild.models.llama_swiftkv.register()``
makes ``AutoConfig`` resolve it. Importing this module imports transformers (and torch): import it only where a
stage runs.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

__all__ = ["LlamaSwiftKVConfig"]


@strict
class LlamaSwiftKVConfig(LlamaConfig):
    """Llama hyper-parameters plus SwiftKV's; the checkpoint sets ``swiftkv: true``, ``num_key_value_layers: 16``,
    ``key_value_group_size: 1`` on a 32-layer Llama 3.1 8B.

    * ``num_key_value_layers``: layers ``0 .. n-1`` run as plain Llama layers; the normed hidden state after layer
      ``n-1`` (``norm_swiftkv``) gives the keys and values of every later layer. None: ``num_hidden_layers``
      (no SwiftKV layer).
    * ``key_value_group_size``: later layers per group sharing one key/value projection (Snowflake's
      ArcticTraining; only the first layer of a group has ``k_proj_swiftkv``/``v_proj_swiftkv``). QEfficient
      ignores it; with the checkpoint's value 1 both agree.
    * ``swiftkv``: recorded, not read (QEfficient does not read it either: the SwiftKV path is always taken).
    """

    model_type = "llama_swiftkv"

    swiftkv: bool = False
    num_key_value_layers: int | None = None
    key_value_group_size: int = 1

    def __post_init__(self, **kwargs) -> None:
        if self.num_key_value_layers is None:
            self.num_key_value_layers = self.num_hidden_layers
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Llama's checks, then SwiftKV's: ``0 < n <= layers`` and groups tiling the later layers."""
        super().validate_architecture()
        n, layers, group = self.num_key_value_layers, self.num_hidden_layers, self.key_value_group_size
        if not 0 < n <= layers:
            raise ValueError(f"num_key_value_layers {n} must be in 1..num_hidden_layers ({layers})")
        if group < 1 or (layers - n) % group:
            raise ValueError(f"key_value_group_size {group} must be >= 1 and divide the {layers - n} SwiftKV layers "
                             f"(num_hidden_layers {layers} - num_key_value_layers {n})")

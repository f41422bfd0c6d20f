"""bench/swiftkv.py: its prefill FLOP counts by hand, and (slow) its --quick run ends with a rule-15 JSON line."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from tests.conftest import quick_bench

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_swiftkv", ROOT / "bench" / "swiftkv.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prefill_flops_by_hand() -> None:
    # hidden 4, intermediate 8, 2 heads of 2 (q 4), 1 KV head (kv 2), vocab 10, 2 layers (1 KV layer), 3 tokens.
    # per token q+o 2*4*4 = 32, MLP 3*4*8 = 96, k+v 2*4*2 = 16 MACs; attention 2 * 4 * keys
    c = SimpleNamespace(hidden_size=4, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1,
                        vocab_size=10, num_hidden_layers=2, num_key_value_layers=1, key_value_group_size=1)
    b = _bench()
    full_layer = 2 * (3 * (32 + 96) + 3 * 16 + 2 * 4 * 6)  # 3 queries see 1 + 2 + 3 = 6 keys
    head = 2 * 4 * 10
    assert b.prefill_flops(c, 3, swiftkv=False) == 2 * full_layer + head
    last_only = 2 * (1 * (32 + 96) + 2 * 4 * 3)  # the last token over 3 keys, no own k/v
    kv_fill = 2 * 3 * 16  # one k/v projection of the 3 tokens' norm_swiftkv state
    assert b.prefill_flops(c, 3, swiftkv=True) == full_layer + last_only + kv_fill + head
    shared = SimpleNamespace(**{**vars(c), "num_hidden_layers": 3, "key_value_group_size": 2})
    assert b.prefill_flops(shared, 3, swiftkv=True) == full_layer + 2 * last_only + kv_fill + head  # one per group


@pytest.mark.slow
def test_quick_bench_ends_with_json_line() -> None:
    last = quick_bench("swiftkv")
    assert 1.5 < last["flop_ratio"] < 2 and 1.5 < last["checkpoint_flop_ratio"] < 2  # half the layers skip prefill
    assert last["swiftkv_gflop"] < last["llama_gflop"]
    for key in ("swiftkv_ms", "llama_ms"):
        assert 0 < last[key]["min"] <= last[key]["median"]
    assert last["time_ratio"] > 0 and last["last_token_max_diff"] < 1e-4

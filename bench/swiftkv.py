"""SwiftKV prefill against the same weights run as plain Llama (all layers over all prompt tokens).

Usage: python bench/swiftkv.py [--quick] [--repeats N] [--seq-len N]
Builds one random SwiftKV model (qbuild/models/llama_swiftkv.py; ``num_key_value_layers`` = half the layers, as
Snowflake/Llama-3.1-SwiftKV-8B-Instruct) and a transformers ``LlamaForCausalLM`` holding the same weights (a
later layer's ``q/k/v_proj`` = its ``*_proj_swiftkv``), both eager attention in float32. Each prefills one prompt
into an empty cache and returns the last token's logits: SwiftKV runs the later layers for that token only,
after filling their caches from ``norm_swiftkv`` in one projection; Llama runs every layer on every token.
Prints the prefill FLOPs computed from the config (2 per multiply-add: projections, MLP, attention scores and
values, the head for one token; norms, RoPE and softmax not counted) and the measured times (min and median of
``--repeats``), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _machine import format_facts, machine_facts  # noqa: E402

#: Snowflake/Llama-3.1-SwiftKV-8B-Instruct's shape (reference qefficient-modes.md 3.7): FLOPs only, not run
CHECKPOINT = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "num_key_value_layers": 16, "key_value_group_size": 1}
#: (hidden, intermediate, layers, heads, kv heads, vocab, prompt tokens) of the default and --quick runs
SIZES = {"default": (768, 2048, 8, 12, 4, 8192, 512), "quick": (256, 704, 4, 8, 2, 2048, 128)}


def layer_flops(c: Any, tokens: int, keys: int, kv_tokens: int) -> int:
    """FLOPs of one Llama layer: ``tokens`` queries through q/o projections, attention over ``keys`` keys each
    (causal prefill: pass the total), MLP; k/v projections for ``kv_tokens`` tokens."""
    d = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    macs = tokens * (2 * c.hidden_size * q + 3 * c.hidden_size * c.intermediate_size)  # q, o, MLP
    macs += kv_tokens * 2 * c.hidden_size * kv  # k, v
    macs += 2 * q * keys  # scores and weighted values: D per head, query and key, twice
    return 2 * macs


def prefill_flops(c: Any, s: int, swiftkv: bool) -> int:
    """Prefill FLOPs of an ``s``-token prompt into an empty cache, the head for the last token only."""
    causal_keys = s * (s + 1) // 2  # query i sees keys 0..i
    head = 2 * c.hidden_size * c.vocab_size
    if not swiftkv:
        return c.num_hidden_layers * layer_flops(c, s, causal_keys, s) + head
    n, later = c.num_key_value_layers, c.num_hidden_layers - c.num_key_value_layers
    groups = later // c.key_value_group_size
    d = c.hidden_size // c.num_attention_heads
    kv_fill = groups * 2 * s * 2 * c.hidden_size * c.num_key_value_heads * d  # one k/v projection per group
    return n * layer_flops(c, s, causal_keys, s) + later * layer_flops(c, 1, s, 0) + kv_fill + head


def build_models(size: tuple[int, ...]) -> tuple[Any, Any]:
    """The SwiftKV model and a plain Llama with the same weights (eager, float32, eval)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbuild.models.llama_swiftkv import LlamaSwiftKVConfig, LlamaSwiftKVForCausalLM

    hidden, inter, layers, heads, kv_heads, vocab, _ = size
    common = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
              "max_position_embeddings": 4096}
    torch.manual_seed(0)
    swift = LlamaSwiftKVForCausalLM(LlamaSwiftKVConfig(**common, swiftkv=True, num_key_value_layers=layers // 2))
    llama = LlamaForCausalLM(LlamaConfig(**common))
    weights = {k.replace("_proj_swiftkv", "_proj"): v for k, v in swift.state_dict().items() if "norm_swiftkv" not in k}
    missing, unexpected = llama.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weight mapping failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for m in (swift, llama):
        m.config._attn_implementation = "eager"
        m.eval().requires_grad_(False)
    return swift, llama


def time_prefill(models: list[Any], ids: Any, repeats: int) -> list[list[float]]:
    """Seconds of each prefill per model (fresh cache, last token's logits), the models interleaved so that a
    busy machine's drift hits both alike; one warm-up each first."""
    import torch

    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(repeats + 1):
            for model, out in zip(models, times, strict=True):
                t0 = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1)
                if i:
                    out.append(time.perf_counter() - t0)
    return times


def check_last_token(swift: Any, ids: Any) -> float:
    """Max |logit difference| between SwiftKV's last-token-only prefill and running it on every token."""
    import torch

    with torch.inference_mode():
        last = swift(ids, use_cache=True, logits_to_keep=1).logits[:, -1]
        full = swift(ids, use_cache=False).logits[:, -1]
    return float((last - full).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model and prompt (seconds)")
    ap.add_argument("--repeats", type=int, default=None, help="timed prefills per model (default 5, quick 3)")
    ap.add_argument("--seq-len", type=int, default=None, help="prompt tokens (default 512, quick 128)")
    args = ap.parse_args()
    import torch

    size = SIZES["quick" if args.quick else "default"]
    seq = args.seq_len or size[-1]
    repeats = args.repeats or (3 if args.quick else 5)
    facts = machine_facts()
    swift, llama = build_models(size)
    c = swift.config
    ids = torch.randint(0, c.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    diff = check_last_token(swift, ids)
    t_swift, t_llama = time_prefill([swift, llama], ids, repeats)
    f_swift, f_llama = prefill_flops(c, seq, True), prefill_flops(c, seq, False)
    rows = [("swiftkv", f_swift, t_swift), ("llama", f_llama, t_llama)]
    print(format_facts(facts))
    print(f"model: hidden {c.hidden_size}, {c.num_hidden_layers} layers ({c.num_key_value_layers} KV layers), "
          f"{c.num_attention_heads}/{c.num_key_value_heads} heads, vocab {c.vocab_size}; prompt {seq} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {repeats} repeats")
    print(f"{'prefill':<10}{'GFLOP':>10}{'min ms':>10}{'median ms':>12}{'GFLOP/s':>10}")
    for name, flops, times in rows:
        print(f"{name:<10}{flops / 1e9:>10.2f}{min(times) * 1e3:>10.1f}{statistics.median(times) * 1e3:>12.1f}"
              f"{flops / min(times) / 1e9:>10.1f}")
    flop_ratio, time_ratio = f_llama / f_swift, min(t_llama) / min(t_swift)
    ckpt = SimpleNamespace(**CHECKPOINT)
    ckpt_ratio = prefill_flops(ckpt, seq, False) / prefill_flops(ckpt, seq, True)
    print(f"SwiftKV saves {1 - f_swift / f_llama:.1%} of the prefill FLOPs ({flop_ratio:.2f}x fewer); measured "
          f"{time_ratio:.2f}x faster (min), last-token logits vs all-token run differ by {diff:.1e}")
    print(f"at the 8B checkpoint's shape and {seq} prompt tokens: {prefill_flops(ckpt, seq, True) / 1e9:.0f} vs "
          f"{prefill_flops(ckpt, seq, False) / 1e9:.0f} GFLOP ({ckpt_ratio:.2f}x fewer; computed, not run)")
    print(json.dumps({
        "bench": "swiftkv", "quick": args.quick, "seq_len": seq, "repeats": repeats,
        "num_hidden_layers": c.num_hidden_layers, "num_key_value_layers": c.num_key_value_layers,
        "swiftkv_gflop": round(f_swift / 1e9, 4), "llama_gflop": round(f_llama / 1e9, 4),
        "flop_ratio": round(flop_ratio, 3), "checkpoint_flop_ratio": round(ckpt_ratio, 3),
        "swiftkv_ms": {"min": round(min(t_swift) * 1e3, 2), "median": round(statistics.median(t_swift) * 1e3, 2)},
        "llama_ms": {"min": round(min(t_llama) * 1e3, 2), "median": round(statistics.median(t_llama) * 1e3, 2)},
        "time_ratio": round(time_ratio, 3), "last_token_max_diff": diff, "machine": facts,
    }))


if __name__ == "__main__":
    main()

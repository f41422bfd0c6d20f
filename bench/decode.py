"""Decode speed: qbuild's ONNX Runtime runtime vs Hugging Face eager generate, same weights, same run.

Usage: python bench/decode.py [--layers 12 --hidden 768 ...] [--quantize none,int8,int4]
A ~100M-parameter random Llama, batch 1, a 32-token prompt, 128 new tokens (EOS disabled). Also
measures memory bandwidth (a large copy) and reports the fraction of the bandwidth limit reached:
limit tokens/s = bandwidth / weight bytes read per token. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bandwidth_gb_s(size_mb: int = 512, reps: int = 5) -> float:
    """Copy bandwidth: bytes read + bytes written per second, best of ``reps``."""
    import numpy as np

    src = np.ones(size_mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def _overrides(a: argparse.Namespace, quantize: str) -> list[str]:
    return [f"model.config.num_hidden_layers={a.layers}", f"model.config.hidden_size={a.hidden}",
            f"model.config.intermediate_size={a.intermediate}", f"model.config.num_attention_heads={a.heads}",
            f"model.config.num_key_value_heads={a.kv_heads}", f"model.config.vocab_size={a.vocab}",
            "model.config.max_position_embeddings=512", "seq.lengths=[32]", "seq.ctx_len=256",
            f"compile.onnxruntime.threads={a.threads}", f"compile.onnxruntime.quantize={quantize}",
            "verify.enabled=false"]


def qbuild_tok_s(a: argparse.Namespace, cache: Path, quantize: str) -> dict[str, float]:
    import numpy as np

    from qbuild.api import build
    from qbuild.runtime.generate import KVRuntime

    manifest = ROOT / "manifests" / "tiny-llama-kv.yaml"
    t0 = time.perf_counter()
    result = build(manifest, _overrides(a, quantize), cache_dir=cache)
    build_s = time.perf_counter() - t0
    compiled = Path(result.artifacts["compiled"])
    size = sum(f.stat().st_size for f in compiled.rglob("*") if f.is_file())
    rt = KVRuntime(compiled, ctx_len=256, buckets=[32], num_threads=a.threads)
    prompt = np.random.RandomState(0).randint(3, a.vocab, 32).tolist()
    rt.generate([prompt], 8, None)  # warm-up
    g = rt.generate([prompt], a.new_tokens, None)
    return {"tok_s": (a.new_tokens - 1) / g.decode_s, "prefill_s": g.prefill_s, "size_mb": size / 1e6,
            "build_s": build_s, "tokens": g.tokens[0]}


def hf_tok_s(a: argparse.Namespace, cache: Path) -> dict[str, float]:
    import numpy as np
    import torch

    from qbuild.api import plan
    from qbuild.models.source import load_model

    torch.set_num_threads(a.threads)
    load = plan(ROOT / "manifests" / "tiny-llama-kv.yaml", _overrides(a, "none"), cache_dir=cache).stage("load")
    model = load_model(load.entry.out / "model", "causal_lm", "float32")
    ids = torch.tensor([np.random.RandomState(0).randint(3, a.vocab, 32).tolist()])
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **kw)
        total = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {"tok_s": (a.new_tokens - 1) / (total - first), "params": params,
            "weight_bytes": params * 4, "tokens": out[0, 32:].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for name, default in [("layers", 12), ("hidden", 768), ("intermediate", 2048), ("heads", 12), ("kv_heads", 4),
                          ("vocab", 16000), ("new_tokens", 128), ("threads", os.cpu_count() or 2)]:
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    ap.add_argument("--quantize", default="none,int8,int4")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        runs = {q: qbuild_tok_s(a, cache, q) for q in a.quantize.split(",")}
        hf = hf_tok_s(a, cache)
    bw = bandwidth_gb_s()
    limit = bw * 1e9 / hf["weight_bytes"]
    base = runs.get("none") or next(iter(runs.values()))
    print(f"model: random Llama, {hf['params'] / 1e6:.0f}M parameters, fp32 weights {hf['weight_bytes'] / 1e6:.0f} MB")
    print(f"{'runtime':<22} {'tok/s':>8} {'size MB':>9} {'vs HF':>7}")
    print(f"{'HF eager generate':<22} {hf['tok_s']:8.1f} {hf['weight_bytes'] / 1e6:9.0f} {1.0:7.2f}")
    for q, r in runs.items():
        print(f"{'qbuild ORT ' + q:<22} {r['tok_s']:8.1f} {r['size_mb']:9.0f} {r['tok_s'] / hf['tok_s']:7.2f}")
    print(f"copy bandwidth {bw:.1f} GB/s -> fp32 limit {limit:.1f} tok/s; qbuild reaches {base['tok_s'] / limit:.0%}")
    print(f"greedy tokens equal HF (fp32): {base['tokens'] == hf['tokens']}")
    print(json.dumps({"bench": "decode", "params_m": round(hf["params"] / 1e6, 1),
                      "qbuild_tok_s": round(base["tok_s"], 2),
                      "hf_tok_s": round(hf["tok_s"], 2), "ratio": round(base["tok_s"] / hf["tok_s"], 3), "goal": 2.0,
                      "bandwidth_gb_s": round(bw, 2), "limit_tok_s": round(limit, 2),
                      "fraction_of_limit": round(base["tok_s"] / limit, 3), "fraction_goal": 0.6,
                      "tokens_match_hf": base["tokens"] == hf["tokens"],
                      "quantized": {q: {"tok_s": round(r["tok_s"], 2), "size_mb": round(r["size_mb"], 1)}
                                    for q, r in runs.items()}}))


if __name__ == "__main__":
    main()

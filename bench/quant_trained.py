"""Quantised tokens against fp32 on a trained checkpoint: int8, int8_block and int4 builds of the same weights.

Usage: python bench/quant_trained.py [--steps 600] [--quantize int8,int8_block,int4,int4:0.99] [--model-dir DIR]
[--quick]
Random weights cannot measure this: their logits are so flat (bench/decode.py: fp32's top-2 margin has median
0.04) that any rounding flips the argmax. So this bench first trains a small Llama for real (AdamW, next-token
loss) on Python's own documentation (``pydoc_data.topics``, shipped with the interpreter: no download), with a
byte-level BPE trained on the same text; every tenth topic is held out. The checkpoint is kept in
``--model-dir`` (keyed by the corpus, the settings and the training code), so later runs skip the training.

qbuild then builds it (tiny-llama-kv.yaml with ``model.path``) in fp32 and each quantisation, and each build:
- generates greedily from prompts cut from the held-out text (``--prompts`` of 32 tokens, ``--new-tokens``
  each): greedy agreement with fp32's tokens (overall, and the prefix before the first divergence), per prompt;
  (``MODE:FLOOR`` builds MODE with ``compile.onnxruntime.quantize_min_cosine=FLOOR``: the MatMuls it keeps in fp32
  are printed);
- is fed the held-out continuations (teacher forcing): top-1 agreement with fp32 at every position, and the
  held-out loss (nats per token) against fp32's: what quantisation costs the model, not only its argmax.
fp32's own tokens are checked against Hugging Face ``generate`` on the same checkpoint. Figures over prompts
are min / median; the last line is one JSON object (DESIGN rule 15).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import format_facts, logit_fidelity, machine_facts, summary, token_agreement  # noqa: E402

PROMPT = 32
CTX = 256
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
DEFAULTS = {"layers": 4, "hidden": 256, "intermediate": 768, "heads": 4, "kv_heads": 2, "vocab": 4096,
            "steps": 600, "batch": 16, "seq": 128, "lr": 3e-3, "prompts": 8, "new_tokens": 128}
QUICK = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 512,
         "steps": 30, "batch": 8, "seq": 64, "lr": 3e-3, "prompts": 3, "new_tokens": 16}
TRAIN_KEYS = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "steps", "batch", "seq", "lr")
GOAL = 0.95


@functools.cache
def corpus() -> tuple[str, str]:
    """(training text, held-out text): Python's documentation topics in name order, every tenth held out."""
    import pydoc_data.topics as topics

    names = sorted(topics.topics)
    train = [topics.topics[n] for i, n in enumerate(names) if i % 10 != 5]
    held = [topics.topics[n] for i, n in enumerate(names) if i % 10 == 5]
    return "\n\n".join(train), "\n\n".join(held)


def train(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train the tokenizer and the model; save both (save_pretrained) in ``out``; returns what happened."""
    import numpy as np
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text, held = corpus()
    t0 = time.perf_counter()
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(text.split("\n\n"), vocab_size=a.vocab, min_frequency=2, show_progress=False,
                            special_tokens=SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    ids = np.array(tok(text)["input_ids"], np.int64)
    held_ids = np.array(tok(held)["input_ids"], np.int64)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / a.steps)))))
    rng = np.random.RandomState(0)
    losses = []
    model.train()
    for step in range(a.steps):
        starts = rng.randint(0, len(ids) - a.seq - 1, a.batch)
        batch = torch.from_numpy(np.stack([ids[s:s + a.seq + 1] for s in starts]))
        loss = _next_token_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, a.steps // 10) == 0 or step == a.steps - 1:
            print(f"  train step {step + 1}/{a.steps}: loss {losses[-1]:.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        windows = [held_ids[s:s + a.seq + 1] for s in range(0, len(held_ids) - a.seq - 1, a.seq)][:64]
        held_loss = float(np.mean([float(_next_token_loss(model, torch.from_numpy(w[None]))) for w in windows]))
    seconds = time.perf_counter() - t0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"train_tokens": len(ids), "held_out_tokens": len(held_ids), "seconds": round(seconds, 1),
            "first_loss": round(losses[0], 3), "last_loss": round(float(np.mean(losses[-10:])), 3),
            "held_out_loss": round(held_loss, 3), "params": sum(p.numel() for p in model.parameters())}
    (out / "training.json").write_text(json.dumps(info, indent=1))
    return info


def _next_token_loss(model: Any, batch: Any) -> Any:
    import torch

    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def checkpoint(a: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The trained checkpoint for these settings: from ``--model-dir`` when there, else trained now (keyed by the
    corpus, torch's version, the settings and the training code)."""
    import torch

    text, held = corpus()
    key = hashlib.sha256(json.dumps({"corpus": hashlib.sha256((text + held).encode()).hexdigest(),
                                     "torch": torch.__version__.split("+")[0],
                                     "recipe": hashlib.sha256("".join(inspect.getsource(f) for f in (
                                         train, _next_token_loss)).encode()).hexdigest(),
                                     **{k: getattr(a, k) for k in TRAIN_KEYS}}, sort_keys=True).encode())
    out = Path(a.model_dir) / f"llama-{key.hexdigest()[:16]}"
    if (out / "training.json").exists():
        return out, {**json.loads((out / "training.json").read_text()), "cached": True}
    tmp = Path(tempfile.mkdtemp(dir=a.model_dir))
    print(f"training a {a.layers}-layer Llama (hidden {a.hidden}) for {a.steps} steps on Python's documentation "
          f"(kept in {out})", flush=True)
    torch.set_num_threads(a.threads)
    info = train(a, tmp)
    try:
        tmp.rename(out)
    except OSError:  # another run finished first: use its checkpoint
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out, {**info, "cached": False}


def held_out_passages(model_dir: Path, n: int, length: int) -> list[list[int]]:
    """``n`` passages of ``PROMPT + length`` tokens from the held-out text, evenly spaced."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    ids = tok(corpus()[1])["input_ids"]
    span = PROMPT + length
    step = max(span, (len(ids) - span) // max(1, n))
    return [ids[s:s + span] for s in range(0, len(ids) - span + 1, step)][:n]


def build_runtime(a: argparse.Namespace, model_dir: Path, cache: Path, spec: str) -> tuple[Any, dict[str, Any]]:
    """The runtime of the ``spec`` build (``MODE`` or ``MODE:FLOOR``, FLOOR = quantize_min_cosine) and its
    quantisation record (what the compile stage kept in fp32)."""
    from qbuild.api import build
    from qbuild.runtime.generate import KVRuntime

    mode, _, floor = spec.partition(":")
    overrides = [f"model.path={model_dir}", "~model.init", "~model.architecture", "~model.config", "~model.tokenizer",
                 f"seq.lengths=[{PROMPT}]", f"seq.ctx_len={CTX}", f"compile.onnxruntime.threads={a.threads}",
                 f"compile.onnxruntime.quantize={mode}", "verify.enabled=false",
                 *([f"compile.onnxruntime.quantize_min_cosine={floor}"] if floor else [])]
    result = build(ROOT / "manifests" / "tiny-llama-kv.yaml", overrides, cache_dir=cache)
    compiled = Path(result.artifacts["compiled"])
    record = json.loads((compiled.parent / "record.json").read_text())["meta"].get("quantization", {})
    return KVRuntime(compiled, ctx_len=CTX, buckets=[PROMPT], num_threads=a.threads), record


def log_softmax_nll(logits: Any, targets: Any) -> float:
    """Mean negative log-likelihood (nats) of ``targets`` under ``logits [T, V]``."""
    import numpy as np

    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].mean())


def hf_tokens(model_dir: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> list[list[int]]:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in DEFAULTS.items():  # None: filled from DEFAULTS, or QUICK with --quick
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    ap.add_argument("--quantize", default="int8,int8_block,int4,int4:0.999",
                    help="builds compared with fp32 (MODE or MODE:FLOOR, FLOOR = quantize_min_cosine)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "qbuild-bench-trained"),
                    help="where trained checkpoints are kept (keyed by corpus, settings and training code)")
    ap.add_argument("--quick", action="store_true", help="a 2-layer model trained 30 steps, 3 short prompts: a "
                                                         "smoke run (its figures mean nothing)")
    a = ap.parse_args()
    for name, value in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    Path(a.model_dir).mkdir(parents=True, exist_ok=True)
    return a


def main() -> None:
    import numpy as np

    a = parse()
    quants = [q for q in a.quantize.split(",") if q and q != "none"]
    model_dir, training = checkpoint(a)
    passages = held_out_passages(model_dir, a.prompts, a.new_tokens)
    prompts = [p[:PROMPT] for p in passages]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for q in ["none", *quants]:
            t0 = time.perf_counter()
            rt, record = build_runtime(a, model_dir, Path(tmp), q)
            build_s = time.perf_counter() - t0
            greedy = [rt.generate([p], a.new_tokens, None).tokens[0] for p in prompts]
            forced = [rt.forced_logits(p[:PROMPT], p[PROMPT:]) for p in passages]
            runs[q] = {"greedy": greedy, "forced": forced, "build_s": build_s, "record": record}
            del rt
    hf = hf_tokens(model_dir, prompts, a.new_tokens, a.threads)
    base = runs["none"]
    # row i of forced logits predicts passage token PROMPT + i (row 0: after the prompt)
    targets = [np.array(p[PROMPT:]) for p in passages]
    fp32_nll = [log_softmax_nll(f, t) for f, t in zip(base["forced"], targets, strict=True)]
    spread = logit_fidelity(np.concatenate(base["forced"]), np.concatenate(base["forced"]))  # fp32's top-2 margins
    fp32_acc = [float((f.argmax(-1) == t).mean()) for f, t in zip(base["forced"], targets, strict=True)]
    for q in quants:
        r = runs[q]
        agree = [token_agreement(ref, got) for ref, got in zip(base["greedy"], r["greedy"], strict=True)]
        top1 = [logit_fidelity(b, f)["top1_agreement"] for f, b in zip(r["forced"], base["forced"], strict=True)]
        nll = [log_softmax_nll(f, t) for f, t in zip(r["forced"], targets, strict=True)]
        results[q] = {
            "greedy_overall": summary([g["overall"] for g in agree]),
            "greedy_overall_mean": statistics.mean(g["overall"] for g in agree),
            "greedy_prefix": summary([g["prefix"] for g in agree]),
            "teacher_forced_top1": summary(top1),
            "teacher_forced_top1_mean": statistics.mean(top1),
            "held_out_nll": statistics.mean(nll),
            "nll_increase": statistics.mean(nll) - statistics.mean(fp32_nll),
            "build_s": r["build_s"],
            "kept_fp32": r["record"].get("kept_fp32", []),
            "matmuls": r["record"].get("matmuls"),
            "symmetric": r["record"].get("symmetric"),
            "head": r["record"].get("head"),  # int4: the output head's MatMuls, quantised in int8 blocks
        }
    facts = machine_facts()
    print(format_facts(facts))
    print(f"model: Llama, {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}, {training['params'] / 1e6:.1f}M "
          f"parameters, trained {a.steps} steps x {a.batch} x {a.seq} tokens on Python's documentation "
          f"({training['train_tokens']} tokens; " + ("cached" if training["cached"] else f"{training['seconds']} s")
          + f"): loss {training['first_loss']} -> {training['last_loss']}, held-out {training['held_out_loss']}")
    print(f"fp32: held-out loss {statistics.mean(fp32_nll):.3f} nats/token, next-token accuracy "
          f"{statistics.mean(fp32_acc):.0%}, top-2 margin median {spread['ref_margin_median']:.3f} "
          f"(min {spread['ref_margin_min']:.4f}); greedy tokens equal HF generate: {base['greedy'] == hf}")
    print(f"{len(prompts)} held-out prompts of {PROMPT} tokens, {a.new_tokens} greedy tokens each; per prompt "
          "min / median")
    print(f"{'build':<11} {'greedy overall':>17} {'mean':>6} {'prefix':>13} {'forced top-1':>15} {'mean':>6} "
          f"{'loss +nats':>10}")
    for q, r in results.items():
        g, p, t = r["greedy_overall"], r["greedy_prefix"], r["teacher_forced_top1"]
        print(f"{q:<11} {g['min']:8.0%} {g['median']:8.0%} {r['greedy_overall_mean']:6.0%} {p['min']:6.0%} "
              f"{p['median']:6.0%} {t['min']:7.0%} {t['median']:7.0%} {r['teacher_forced_top1_mean']:6.0%} "
              f"{r['nll_increase']:10.4f}"
              + (f"  (kept in fp32: {', '.join(r['kept_fp32']) or 'none'})" if ":" in q else "")
              + (f"  (head in {r['head']['quantize']}: {', '.join(r['head']['matmuls'])})" if r["head"] else ""))
    rnd = {k: round(v, 4) for k, v in summary(fp32_nll).items()}
    print(json.dumps({
        "bench": "quant_trained", "quick": a.quick, "params_m": round(training["params"] / 1e6, 2),
        "training": training, "prompts": len(prompts), "new_tokens": a.new_tokens, "threads": a.threads,
        "fp32": {"held_out_nll": rnd, "next_token_accuracy": round(statistics.mean(fp32_acc), 4),
                 "top2_margin_median": round(spread["ref_margin_median"], 4), "tokens_match_hf": base["greedy"] == hf},
        "quantized": {q: {k: ({kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in v.items()}
                              if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v)
                          for k, v in r.items()} for q, r in results.items()},
        "agreement_goal": GOAL, "machine": facts}))


if __name__ == "__main__":
    main()

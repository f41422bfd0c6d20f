"""LoRA finetuning with and without gradient checkpointing: peak RSS and seconds per optimizer step.

Usage: python bench/finetune.py [--repeats N] [--steps N] [--quick]
A random Llama (hidden 512, 8 layers, vocab 8192; --quick: hidden 64, 2 layers) is trained by qbuild's
finetune recipe (qbuild.finetune.lora: LoRA on q/v, AdamW) on fixed random token rows of seq 256 (--quick:
32), batch 4, once per repeat and setting, each in a fresh process so its peak RSS (VmHWM) is its own.
The reference is the same run without gradient checkpointing, measured in the same invocation; seconds
per step leave out the first (warm-up) step. Prints min and median of each figure and the machine facts,
checks the per-step losses agree, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _machine import format_facts, machine_facts, summary  # noqa: E402

FULL = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": 8192, "max_position_embeddings": 512}
QUICK = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128}


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(args: dict[str, Any]) -> dict[str, Any]:
    """One training run in this (fresh) process: per-step losses and seconds, RSS before and at peak."""
    import torch

    from qbuild.finetune import lora
    from qbuild.models.source import load_model

    s = lora.TrainSettings(steps=args["steps"], epochs=1, batch_size=args["batch"], gradient_accumulation_steps=1,
                           learning_rate=1e-3, weight_decay=0.0, gradient_checkpointing=args["ckpt"], seed=0, r=8,
                           alpha=16.0, dropout=0.05, target_modules=("q_proj", "v_proj"))
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, args["vocab"], (args["batch"] * args["steps"], args["seq"]), generator=g).tolist()
    data = [(r, r) for r in rows]
    model = lora.apply_lora(load_model(Path(args["model"]), "causal_lm", "float32"), s)
    before = _rss("VmRSS")
    steps = lora.train(model, data, s, pad_id=0)
    return {"losses": [x["loss"] for x in steps], "seconds": [x["seconds"] for x in steps],
            "rss_before_bytes": before, "peak_rss_bytes": _rss("VmHWM"), "threads": torch.get_num_threads()}


def _run_child(args: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is a warm-up)")
    ap.add_argument("--quick", action="store_true", help="a tiny model, seq 32, 2 steps, 1 repeat: a smoke test")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    config, seq = (QUICK, 32) if a.quick else (FULL, 256)
    repeats, steps = (1, 2) if a.quick else (a.repeats, max(2, a.steps))
    from qbuild.models.source import init_random

    with tempfile.TemporaryDirectory() as tmp:
        info = init_random("llama", config, 0, "float32", Path(tmp) / "model")
        base = {"model": str(Path(tmp) / "model"), "steps": steps, "batch": 4, "seq": seq,
                "vocab": config["vocab_size"]}
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        t0 = time.perf_counter()
        for _ in range(repeats):
            for ckpt in (False, True):
                runs[ckpt].append(_run_child({**base, "ckpt": ckpt}))
        wall = time.perf_counter() - t0
    fig = {}
    for ckpt, rs in runs.items():
        name = "ckpt" if ckpt else "plain"
        per_step = [statistics.median(r["seconds"][1:]) for r in rs]
        fig[name] = {"s_per_step": summary(per_step), "peak_rss_mb": summary([r["peak_rss_bytes"] / 2**20 for r in rs]),
                     "train_rss_mb": summary([(r["peak_rss_bytes"] - r["rss_before_bytes"]) / 2**20 for r in rs])}
    diff = max(abs(x - y) for p, c in zip(runs[False], runs[True], strict=True)
               for x, y in zip(p["losses"], c["losses"], strict=True))
    facts = machine_facts()
    print(format_facts(facts))
    print(f"model: llama hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, vocab "
          f"{config['vocab_size']} ({info['num_parameters'] / 1e6:.1f} M parameters); LoRA r=8 on q/v; batch 4 x seq "
          f"{seq}; {steps} steps per run (first left out), {repeats} repeat(s), torch threads "
          f"{runs[False][0]['threads']}; {wall:.1f} s in all")
    print(f"{'setting':<24} {'s/step min':>10} {'median':>8} {'peak RSS MB min':>16} {'median':>8} "
          f"{'peak - before MB min':>21} {'median':>8}")
    for name, label in (("plain", "no checkpointing"), ("ckpt", "gradient checkpointing")):
        f = fig[name]
        print(f"{label:<24} {f['s_per_step']['min']:10.3f} {f['s_per_step']['median']:8.3f} "
              f"{f['peak_rss_mb']['min']:16.1f} {f['peak_rss_mb']['median']:8.1f} "
              f"{f['train_rss_mb']['min']:21.1f} {f['train_rss_mb']['median']:8.1f}")
    mem_ratio = fig["ckpt"]["peak_rss_mb"]["median"] / fig["plain"]["peak_rss_mb"]["median"]
    train_ratio = fig["ckpt"]["train_rss_mb"]["median"] / max(fig["plain"]["train_rss_mb"]["median"], 1e-9)
    time_ratio = fig["ckpt"]["s_per_step"]["median"] / fig["plain"]["s_per_step"]["median"]
    print(f"checkpointing / plain: peak RSS {mem_ratio:.3f}, training memory (peak - before) {train_ratio:.3f}, "
          f"s/step {time_ratio:.3f}; per-step losses agree within {diff:.2e}")
    print(json.dumps({
        "bench": "finetune", "quick": a.quick, "repeats": repeats, "steps": steps, "seq": seq,
        "hidden": config["hidden_size"], "layers": config["num_hidden_layers"],
        "plain_s_per_step": round(fig["plain"]["s_per_step"]["median"], 4),
        "ckpt_s_per_step": round(fig["ckpt"]["s_per_step"]["median"], 4),
        "plain_peak_rss_mb": round(fig["plain"]["peak_rss_mb"]["median"], 1),
        "ckpt_peak_rss_mb": round(fig["ckpt"]["peak_rss_mb"]["median"], 1),
        "plain_train_rss_mb": round(fig["plain"]["train_rss_mb"]["median"], 1),
        "ckpt_train_rss_mb": round(fig["ckpt"]["train_rss_mb"]["median"], 1),
        "peak_rss_ratio": round(mem_ratio, 4), "train_rss_ratio": round(train_ratio, 4),
        "time_ratio": round(time_ratio, 4), "max_loss_diff": diff, "losses_agree": diff <= 1e-5,
        "figures": fig, "machine": facts,
    }))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

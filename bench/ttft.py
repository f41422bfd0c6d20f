"""Time to first token: a cached `qbuild run MANIFEST --prompt hi`, from process start to its first text on stdout.

Usage: python bench/ttft.py [--runs N] [--manifest PATH] [--max-new-tokens N] [--cache-dir DIR]
Measures in the same run: `python -c pass` (interpreter floor), the cached no-op build `qbuild MANIFEST`
(what `run` pays before it generates) and `python -c "import torch"` (what a run that imports torch pays).
The first text arrives when the prompt and the first complete generated text are printed (streamed, flushed).
Ends with one JSON line.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _machine import format_facts, machine_facts  # noqa: E402

GOAL_S = 1.0


def _first_output(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds from start to the first byte on stdout, and to the process's end."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    proc.stdout.read()
    if proc.wait() != 0 or not first:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    return t_first, time.perf_counter() - t0


def _walls(cmd: list[str], runs: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--manifest", default=str(ROOT / "manifests" / "tiny-llama-kv.yaml"))
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--cache-dir", help="a cache to use (default: a fresh one, built first)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "QBUILD_CACHE": args.cache_dir or tmp, "PYTHONUNBUFFERED": "1"}
        qbuild = [sys.executable, "-m", "qbuild"]
        run = [*qbuild, "run", args.manifest, "--prompt", "hi", "--max-new-tokens", str(args.max_new_tokens)]
        warm = subprocess.run([*run, "--json"], check=True, capture_output=True, text=True, env=env, cwd=ROOT)
        tokenizer = json.loads(warm.stdout)["stats"].get("tokenizer", "transformers")
        timings = [_first_output(run, env) for _ in range(args.runs)]
        firsts, totals = (list(t) for t in zip(*timings, strict=True))
        walls = {"qbuild run: first text": firsts, "qbuild run: whole process": totals,
                 "python -c pass": _walls([sys.executable, "-c", "pass"], args.runs, env),
                 "qbuild no-op build": _walls([*qbuild, args.manifest], args.runs, env),
                 "python -c 'import torch'": _walls([sys.executable, "-c", "import torch"], max(3, args.runs // 3),
                                                    env)}
    ttft, total, floor, noop, torch = (statistics.median(v) for v in walls.values())
    print(format_facts(machine_facts()))
    print(f"{'command':<28} {'min s':>9} {'median s':>9}   ({args.runs} runs, {args.max_new_tokens} new tokens, "
          f"tokenizer: {tokenizer})")
    for name, t in walls.items():
        print(f"{name:<28} {min(t):9.3f} {statistics.median(t):9.3f}")
    print(f"ttft / goal ({GOAL_S} s): {ttft / GOAL_S:.2f}   ttft / import torch: {ttft / torch:.2f}")
    print(json.dumps({"bench": "ttft", "runs": args.runs, "ttft_s": round(ttft, 4), "run_total_s": round(total, 4),
                      "python_start_s": round(floor, 4), "noop_build_s": round(noop, 4),
                      "import_torch_s": round(torch, 4), "ratio_to_import_torch": round(ttft / torch, 3),
                      "tokenizer": tokenizer, "goal_s": GOAL_S, "meets_goal": ttft <= GOAL_S,
                      "ttft_min_s": round(min(firsts), 4), "machine": machine_facts()}))


if __name__ == "__main__":
    main()

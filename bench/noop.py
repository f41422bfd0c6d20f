"""No-op build: median wall time of a fully cached `qbuild MANIFEST` against start-up references.

Usage: python bench/noop.py [--runs N] [--manifest PATH]
Measures in the same run, min and median of each, with the machine facts: `python -c pass` (interpreter
floor), `python -c "import torch"` (what a tool that imports torch pays), and `qbuild MANIFEST` on a warm
cache. Ends with one JSON line.
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

GOAL_S = 0.3


def _walls(cmd: list[str], runs: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--manifest", default=str(ROOT / "manifests" / "tiny-llama.yaml"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "QBUILD_CACHE": cache}
        build = [sys.executable, "-m", "qbuild", args.manifest]
        subprocess.run(build, check=True, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)  # warm the cache
        walls = {"qbuild no-op build": _walls(build, args.runs, env),
                 "python -c pass": _walls([sys.executable, "-c", "pass"], args.runs, env),
                 "python -c 'import torch'": _walls([sys.executable, "-c", "import torch"], max(3, args.runs // 3),
                                                    env)}
    noop, floor, torch = (statistics.median(v) for v in walls.values())
    print(format_facts(machine_facts()))
    print(f"{'command':<28} {'min s':>9} {'median s':>9}   ({args.runs} runs)")
    for name, t in walls.items():
        print(f"{name:<28} {min(t):9.3f} {statistics.median(t):9.3f}")
    print(f"no-op / goal ({GOAL_S} s): {noop / GOAL_S:.2f}   no-op / import torch: {noop / torch:.2f}")
    print(json.dumps({"bench": "noop", "runs": args.runs, "qbuild_noop_s": round(noop, 4),
                      "python_start_s": round(floor, 4), "import_torch_s": round(torch, 4),
                      "ratio_to_import_torch": round(noop / torch, 3), "goal_s": GOAL_S,
                      "meets_goal": noop <= GOAL_S,
                      "qbuild_noop_min_s": round(min(walls["qbuild no-op build"]), 4), "machine": machine_facts()}))


if __name__ == "__main__":
    main()

"""Sweep: wall time of an N-variant compile sweep (one shared cache, Hydra's joblib launcher) against N
sequential cold builds of the same variants (each its own cache, as ad-hoc scripts redo every step).

Usage: python bench/sweep.py [--jobs 2] [--manifest PATH]
Variants: compile.onnxruntime.threads in {1, 2} x seq.lengths in {[32], [32,64]} (4 jobs), verify off.
Also counts the export entries each approach made (the sweep should make exactly one). Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS, LENGTHS = ("1", "2"), ("[32]", "[32,64]")


def _exports(cache: Path) -> int:
    return len(list((cache / "objects" / "export").glob("*/record.json")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--manifest", default=str(ROOT / "manifests" / "tiny-llama-kv.yaml"))
    args = ap.parse_args()
    common = ["verify.enabled=false"]
    with tempfile.TemporaryDirectory() as tmp:
        caches = []
        t0 = time.perf_counter()
        for i, (t, n) in enumerate((t, n) for t in THREADS for n in LENGTHS):
            cache = Path(tmp) / f"cold{i}"
            caches.append(cache)
            subprocess.run([sys.executable, "-m", "qbuild", args.manifest, f"compile.onnxruntime.threads={t}",
                            f"seq.lengths={n}", *common, "--cache-dir", str(cache)], check=True,
                           stdout=subprocess.DEVNULL, cwd=tmp)
        sequential = time.perf_counter() - t0
        shared = Path(tmp) / "shared"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qbuild", args.manifest, "-m",
                               f"compile.onnxruntime.threads={','.join(THREADS)}", f"seq.lengths={','.join(LENGTHS)}",
                               *common, "--jobs", str(args.jobs), "--cache-dir", str(shared), "--json"],
                              check=True, capture_output=True, text=True, cwd=tmp)
        swept = time.perf_counter() - t0
        rows = json.loads(proc.stdout.splitlines()[-1])["rows"]
        assert all(r["status"] == "ok" for r in rows), rows
        seq_exports, sweep_exports = sum(_exports(c) for c in caches), _exports(shared)
    n = len(rows)
    print(f"{n}-variant compile sweep of {Path(args.manifest).name} (verify off)")
    print(f"  {n} sequential cold builds   {sequential:7.2f} s   {seq_exports} exports")
    print(f"  qbuild -m (joblib, {args.jobs} jobs)  {swept:7.2f} s   {sweep_exports} export")
    print(f"  ratio {sequential / swept:.2f}x")
    print(json.dumps({"bench": "sweep", "variants": n, "jobs": args.jobs, "sequential_cold_s": round(sequential, 3),
                      "sweep_s": round(swept, 3), "ratio": round(sequential / swept, 3),
                      "sequential_exports": seq_exports, "sweep_exports": sweep_exports}))


if __name__ == "__main__":
    main()

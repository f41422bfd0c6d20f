"""Sweep: wall time of an N-variant compile sweep (one shared cache, Hydra's joblib launcher) against N
sequential cold builds of the same variants (each its own cache, as ad-hoc scripts redo every step).

Usage: python bench/sweep.py [--jobs 2] [--repeats 3] [--manifest PATH]
Variants: compile.onnxruntime.threads in {1, 2} x seq.lengths in {[32], [32,64]} (4 jobs), verify off.
Also counts the export entries each approach made (the sweep should make exactly one). Ends with one
JSON line. Each approach is timed ``--repeats`` times on fresh caches (min and median); the machine facts
are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS, LENGTHS = ("1", "2"), ("[32]", "[32,64]")
sys.path.insert(0, str(ROOT / "bench"))

from _machine import format_facts, machine_facts  # noqa: E402


def _exports(cache: Path) -> int:
    return len(list((cache / "objects" / "export").glob("*/record.json")))


def _once(manifest: str, jobs: int) -> tuple[float, float, int, int, int]:
    """(sequential cold seconds, sweep seconds, variants, exports made sequentially, exports made by the sweep)."""
    common = ["verify.enabled=false"]
    with tempfile.TemporaryDirectory() as tmp:
        caches = []
        t0 = time.perf_counter()
        for i, (t, n) in enumerate((t, n) for t in THREADS for n in LENGTHS):
            cache = Path(tmp) / f"cold{i}"
            caches.append(cache)
            subprocess.run([sys.executable, "-m", "qbuild", manifest, f"compile.onnxruntime.threads={t}",
                            f"seq.lengths={n}", *common, "--cache-dir", str(cache)], check=True,
                           stdout=subprocess.DEVNULL, cwd=tmp)
        sequential = time.perf_counter() - t0
        shared = Path(tmp) / "shared"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qbuild", manifest, "-m",
                               f"compile.onnxruntime.threads={','.join(THREADS)}", f"seq.lengths={','.join(LENGTHS)}",
                               *common, "--jobs", str(jobs), "--cache-dir", str(shared), "--json"],
                              check=True, capture_output=True, text=True, cwd=tmp)
        swept = time.perf_counter() - t0
        rows = json.loads(proc.stdout.splitlines()[-1])["rows"]
        assert all(r["status"] == "ok" for r in rows), rows
        return sequential, swept, len(rows), sum(_exports(c) for c in caches), _exports(shared)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--manifest", default=str(ROOT / "manifests" / "tiny-llama-kv.yaml"))
    args = ap.parse_args()
    runs = [_once(args.manifest, args.jobs) for _ in range(args.repeats)]
    seqs, sweeps = [r[0] for r in runs], [r[1] for r in runs]
    ratios = [a / b for a, b in zip(seqs, sweeps, strict=True)]
    n, seq_exports, sweep_exports = runs[-1][2:]
    print(format_facts(machine_facts()))
    print(f"{n}-variant compile sweep of {Path(args.manifest).name} (verify off), {args.repeats} repeats: min / median")
    print(f"  {n} sequential cold builds   {min(seqs):7.2f} {statistics.median(seqs):7.2f} s   {seq_exports} exports")
    print(f"  qbuild -m (joblib, {args.jobs} jobs)  {min(sweeps):7.2f} {statistics.median(sweeps):7.2f} s   "
          f"{sweep_exports} export")
    print(f"  ratio min {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x")
    print(json.dumps({"bench": "sweep", "variants": n, "jobs": args.jobs, "repeats": args.repeats,
                      "sequential_cold_s": round(statistics.median(seqs), 3),
                      "sequential_cold_min_s": round(min(seqs), 3),
                      "sweep_s": round(statistics.median(sweeps), 3), "sweep_min_s": round(min(sweeps), 3),
                      "ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
                      "sequential_exports": seq_exports, "sweep_exports": sweep_exports, "machine": machine_facts()}))


if __name__ == "__main__":
    main()

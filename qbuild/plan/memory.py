"""Memory before it hurts: an estimate of a build's peak memory over its export and compile, checked against
what the machine has.

The export reads the model's weights and writes them to ONNX; the compile stage (ONNX Runtime) opens sessions
on them. Both peaks grow with the weight bytes. The estimate is ``BASE + ratio x weight bytes``: ``ratio`` is
the median, over earlier exports in this cache whose weights were at least ``MIN_SAMPLE_BYTES`` (smaller models
measure the fixed overhead, not a ratio), of ``(peak RSS - RSS at start) / weight bytes`` of that export or of a
compile built from it, whichever is larger; else ``DEFAULT_RATIO``. Measured for a 125M-parameter Llama on CPU
(issue 16): export 0.4x, compile 0.9x; an export keeps every weight it read resident (1.6x at 20M) on a kernel
without MADV_PAGEOUT (Linux < 5.4); before issue 16's export work, 4.9x. The memory available
is the kernel's ``MemAvailable``, lowered by a cgroup limit and by ``$QBUILD_MEMORY_LIMIT`` (e.g. ``8G``).
``$QBUILD_IGNORE_MEMORY=1`` (``--ignore-memory``) builds anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.errors import ManifestError, PlanError

BASE = 512 * 2**20  # Python, torch and transformers imported, before the model is read
#: the largest of the measured ratios above, with room for other families and versions
DEFAULT_RATIO = 2.0
MIN_SAMPLE_BYTES = 50 * 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weight_bytes(model_dir: Path) -> int | None:
    """Bytes of the checkpoint's weight files in ``model_dir`` (None when there are none)."""
    try:
        sizes = [p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES]
    except OSError:
        return None
    return sum(sizes) or None


def parse_size(text: str, what: str) -> int:
    """``8G``, ``1.5GiB``, ``500M``, ``123`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text, re.IGNORECASE)
    if not m:
        raise ManifestError(f"{what}: {text!r} is not a size (e.g. 8G, 1.5GiB, 500M)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))


def available_bytes() -> int | None:
    """MemAvailable, lowered by the cgroup's limit and by ``$QBUILD_MEMORY_LIMIT``; None if unknown."""
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    if os.environ.get("QBUILD_MEMORY_LIMIT"):
        found.append(parse_size(os.environ["QBUILD_MEMORY_LIMIT"], "$QBUILD_MEMORY_LIMIT"))
    return min(found) if found else None


def _records(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The readable ``record.json`` files of a stage's entries (a torn or foreign one is skipped)."""
    for rec in directory.glob("*/record.json"):
        with contextlib.suppress(OSError, ValueError):
            r = json.loads(rec.read_text())
            if isinstance(r, dict):
                yield rec, r


def _excess(r: dict[str, Any], weights: int) -> float | None:
    """(peak - start) RSS / weight bytes of one record, if it holds both."""
    peak, start = r.get("peak_rss_bytes"), r.get("start_rss_bytes")
    if not isinstance(peak, int) or not isinstance(start, int):
        return None
    return max(0.0, (peak - start) / weights)


def measured_ratio(cache_root: Path) -> tuple[float, int]:
    """(ratio, number of earlier exports it was measured over); (DEFAULT_RATIO, 0) without any."""
    objects = cache_root / "objects"
    weights: dict[str, int] = {}  # export key -> weight bytes, exports of MIN_SAMPLE_BYTES or more
    worst: dict[str, float] = {}  # export key -> the larger ratio of the export and its compiles
    for rec, r in _records(objects / "export"):
        w, key = r.get("weight_bytes"), r.get("key") or rec.parent.name
        if isinstance(w, int) and w >= MIN_SAMPLE_BYTES:
            weights[key] = w
            if (ratio := _excess(r, w)) is not None:
                worst[key] = ratio
    for _rec, r in _records(objects / "compile"):
        upstream = r.get("identity", {}).get("upstream", {}) if isinstance(r.get("identity"), dict) else {}
        key = upstream.get("export") if isinstance(upstream, dict) else None
        if key in weights and (ratio := _excess(r, weights[key])) is not None:
            worst[key] = max(worst.get(key, 0.0), ratio)
    ratios = list(worst.values())
    return (statistics.median(ratios), len(ratios)) if ratios else (DEFAULT_RATIO, 0)


@dataclass(frozen=True)
class Estimate:
    """A build's estimated peak memory (its export and compile) and what it rests on."""

    weight_bytes: int
    ratio: float
    samples: int
    available: int | None

    @property
    def peak(self) -> int:
        return int(BASE + self.ratio * self.weight_bytes)

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak <= self.available

    def describe(self) -> str:
        basis = (f"measured over {self.samples} earlier export(s) and their compiles" if self.samples
                 else "the default; no earlier export of >= 50 MB of weights in this cache")
        have = "unknown" if self.available is None else _gb(self.available)
        return (f"export + compile: estimated peak memory {_gb(self.peak)} = {_gb(BASE)} + {self.ratio:.1f} x "
                f"{_gb(self.weight_bytes)} of weights (ratio {basis}); available {have}")


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def model_dir_of(plan: Any, entries: dict[str, Any] | None = None) -> Path | None:
    """Where the weights the export reads lie, if known before it runs."""
    load = plan.stage("load")
    model = load.resolved.params.model
    if model.directory:
        return Path(model.directory)
    entry = (entries or {}).get("load") or load.entry
    return entry.out / "model" if entry is not None else None


def model_dir_of_entries(export: Any, entries: dict[str, Any]) -> Path | None:
    """Where the weights an export stage read lie (its params' model, else the load entry)."""
    model = getattr(export.resolved.params, "model", None)
    if model is not None and getattr(model, "directory", None):
        return Path(model.directory)
    return entries["load"].out / "model" if "load" in entries else None


def export_estimate(plan: Any, cache_root: Path, entries: dict[str, Any] | None = None) -> Estimate | None:
    """The estimate for the plan's export, when the weights it reads are known (None otherwise)."""
    directory = model_dir_of(plan, entries)
    w = weight_bytes(directory) if directory is not None else None
    if not w:
        return None
    ratio, samples = measured_ratio(cache_root)
    return Estimate(w, ratio, samples, available_bytes())


def check(estimate: Estimate | None, manifest: str) -> None:
    """PlanError when the export would not fit (unless ``$QBUILD_IGNORE_MEMORY=1``)."""
    if estimate is None or estimate.fits or os.environ.get("QBUILD_IGNORE_MEMORY") == "1":
        return
    raise PlanError(f"{manifest}: the export and compile need more memory than this machine has: {estimate.describe()}",
                    hint="free memory, build on a larger machine, export in bf16 (model.dtype), or run anyway "
                         "with --ignore-memory (QBUILD_IGNORE_MEMORY=1)")

"""Bundles: a manifest's final artifacts with their provenance, for CI to upload and a deploy step to check.

``qbuild MANIFEST ... --out DIR`` writes ``DIR/<manifest name>/``::

    compiled/...        the compiled artifact (the compile stage's output)
    tokenizer/...       the tokenizer files the runtime needs (causal LMs and embedding models)
    verify.json         the verify stage's report, when verify ran
    provenance.json     what the files were built from (below), with every file's size and sha256

Files are copies of the cache's (reflinks, sharing the blocks, where the filesystem can), never hard links:
onnx refuses external data with several links, which would make both the bundle and the cache entry
unloadable with ``onnx.load``. ``provenance.json`` holds the resolved manifest, every stage's key
and identity (keyed params, input digests, upstream keys, tool versions, recipe code digests), the
compiler's exact command, per-stage seconds and peak RSS, host facts and qbuild's version, and a
``seal``: the sha256 of the rest of the file. ``qbuild verify-bundle DIR`` re-reads every file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from qbuild.errors import BundleError
from qbuild.store.statcache import hash_file

PROVENANCE = "provenance.json"
FORMAT = 1
#: files of a tokenizer directory that a runtime reads (weights are never bundled)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "vocab.txt", "merges.txt", "tokenizer.model", "added_tokens.json", "config.json",
                   "generation_config.json", "chat_template.jinja")


def seal(data: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``data`` without its ``seal`` field."""
    body = {k: v for k, v in data.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def host_facts() -> dict[str, Any]:
    """The machine that built: CPU model and count, memory, OS, Python."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    return {"hostname": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(), "memory_bytes": memory,
            "os": platform.platform(), "python": platform.python_version()}


#: Linux's FICLONE ioctl: ``dest`` shares ``src``'s blocks, copy-on-write (btrfs, XFS, bcachefs, ...)
_FICLONE = 0x40049409


def _place(src: Path, dest: Path) -> str:
    """Copy ``src`` to ``dest`` (a reflink where the filesystem can: no bytes copied); which one it was.

    Never a hard link: onnx (1.23) refuses to load external data from a file with more than one link ("a
    potential hardlink attack"), so a linked bundle, and the cache entry it linked, could not be ``onnx.load``-ed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl

        with open(src, "rb") as s, open(dest, "wb") as d:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
        shutil.copystat(src, dest)
        return "reflink"
    except (OSError, ImportError):
        shutil.copy2(src, dest)
        return "copy"


def write_bundle(out_root: Path, plan: Any, result: Any, store: Any) -> Path:
    """Write ``out_root/<manifest name>/`` for a finished build (``plan`` and ``result`` of one manifest)."""
    from qbuild import __version__

    name = plan.composed.name
    target = Path(out_root) / name
    tmp = Path(out_root) / f".{name}.{os.getpid()}.tmp"
    for stale in (tmp,):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        tmp.mkdir(parents=True)
        placed: dict[str, str] = {}
        compiled = Path(result.artifacts["compiled"])
        for f in sorted(p for p in compiled.rglob("*") if p.is_file()):
            placed[f"compiled/{f.relative_to(compiled).as_posix()}"] = _place(f, tmp / "compiled" /
                                                                              f.relative_to(compiled))
        if "report" in result.artifacts:
            placed["verify.json"] = _place(Path(result.artifacts["report"]), tmp / "verify.json")
        if result.tokenizer_dir:
            tok = Path(result.tokenizer_dir)
            for fname in TOKENIZER_FILES:
                if (tok / fname).is_file():
                    placed[f"tokenizer/{fname}"] = _place(tok / fname, tmp / "tokenizer" / fname)
        files = {rel: {"size": (tmp / rel).stat().st_size, "sha256": hash_file(tmp / rel)} for rel in sorted(placed)}
        provenance = {
            "format": FORMAT,
            "qbuild": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "manifest": {"name": name, "source": str(plan.composed.source), "resolved": plan.composed.config},
            "stages": [_stage(sp, result, store) for sp in plan.stages],
            "compiler": _compiler(plan, store),
            "host": host_facts(),
            "files": files,
        }
        provenance["seal"] = seal(provenance)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"--out: cannot write the bundle {target}: {exc.strerror or exc}") from exc
    return target


def _stage(sp: Any, result: Any, store: Any) -> dict[str, Any]:
    row = next((s for s in result.stages if s["name"] == sp.name), {})
    entry, _ = store.lookup(sp.name, sp.key)
    record = entry.record if entry is not None else {}
    return {"name": sp.name, "key": sp.key, "state": row.get("state"), "identity": sp.identity,
            "seconds": record.get("seconds"), "peak_rss_bytes": record.get("peak_rss_bytes"),
            "created": record.get("created"), "pulled_from": record.get("pulled_from")}


def _compiler(plan: Any, store: Any) -> dict[str, Any]:
    """The compile stage's backend, tool versions and exact command / configuration."""
    compile_plan, export_plan = plan.stage("compile"), plan.stage("export")
    export, _ = store.lookup("export", export_plan.key)
    onnx = export.out / export.meta["onnx"] if export is not None else None
    backend = compile_plan.stage.backend
    return {"backend": backend.name, "tools": compile_plan.identity.get("tools", {}),
            "command": backend.describe(compile_plan.resolved.params, onnx)}


def _bundles(directory: Path) -> list[Path]:
    if (directory / PROVENANCE).is_file():
        return [directory]
    found = sorted(p.parent for p in directory.glob(f"*/{PROVENANCE}"))
    if not found:
        raise BundleError(f"verify-bundle: no {PROVENANCE} in {directory} or its subdirectories")
    return found


def verify_bundle(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Re-digest every bundle under ``directory`` (a bundle, or a directory of bundles) from the bytes;
    one ``{"bundle", "files", "problems"}`` per bundle. Raises BundleError listing the problems, if any."""
    root = Path(directory)
    if not root.is_dir():
        raise BundleError(f"verify-bundle: {root} is not a directory")
    reports = []
    for bundle in _bundles(root):
        problems: list[str] = []
        try:
            provenance = json.loads((bundle / PROVENANCE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            reports.append({"bundle": str(bundle), "files": 0, "problems": [f"{PROVENANCE} unreadable: {exc}"]})
            continue
        if provenance.get("seal") != seal(provenance):
            problems.append(f"{PROVENANCE}: seal mismatch (edited after it was written)")
        files = provenance.get("files", {})
        for rel, info in sorted(files.items()):
            f = bundle / rel
            if not f.is_file():
                problems.append(f"{rel}: missing")
            elif f.stat().st_size != info["size"]:
                problems.append(f"{rel}: size {f.stat().st_size} != {info['size']}")
            elif hash_file(f) != info["sha256"]:
                problems.append(f"{rel}: sha256 differs from provenance")
        for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
            rel = f.relative_to(bundle).as_posix()
            if rel != PROVENANCE and rel not in files:
                problems.append(f"{rel}: not in provenance")
        reports.append({"bundle": str(bundle), "files": len(files), "problems": problems})
    bad = [r for r in reports if r["problems"]]
    if bad:
        lines = [f"{r['bundle']}: {p}" for r in bad for p in r["problems"]]
        raise BundleError(f"verify-bundle: {len(lines)} problem(s):\n  " + "\n  ".join(lines[:50]))
    return reports

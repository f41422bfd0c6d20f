"""``qbuild cache ls|du|verify|gc|rm``: look after the cache directory (logic in qbuild.store.maintenance)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qbuild.errors import EXIT_INTERRUPTED, CacheError, QBuildError

DESCRIPTION = """Look after a qbuild cache. Entries (objects/<stage>/<key>) are made read-only when they are
published, so that no tool modifies a cached artifact in place; that is why a plain `rm -rf cache` fails
for a non-root user with "Permission denied". `qbuild cache rm --all` empties the cache, `qbuild cache gc`
trims it, and neither removes an entry a running build is building or reading."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=argparse.SUPPRESS,
                        help="cache directory (default $QBUILD_CACHE or ./cache)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object")
    p = argparse.ArgumentParser(prog="qbuild cache", description=DESCRIPTION, parents=[common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{ls,du,verify,gc,rm}")
    sub.add_parser("ls", parents=[common], help="entries: stage, key, size, created, last use, manifests needing them")
    sub.add_parser("du", parents=[common], help="bytes per stage and per part of the cache")
    sub.add_parser("verify", parents=[common],
                   help="re-digest every file from its bytes, check record seals; remove what is damaged "
                        "(exit 8 when something was)")
    gc = sub.add_parser("gc", parents=[common], help="remove least recently used entries, memos and logs",
                        description="Remove least recently used entries (and compose memos and logs) older than "
                                    "AGE and/or until the cache holds at most SIZE, never one a --keep manifest "
                                    "needs nor one being built or read; lock files, use markers and histories "
                                    "left without an entry, and staging of dead processes, go too.")
    gc.add_argument("--max-size", help="bring the cache under SIZE: 500M, 2G, 1.5GiB (K/M/G: powers of 1024)")
    gc.add_argument("--older-than", help="remove what was last used longer ago than AGE: 30m, 12h, 7d, 2w")
    gc.add_argument("--keep", action="append", default=[], metavar="MANIFEST",
                    help="never remove what this manifest needs (repeatable; quote overrides with it: "
                         "--keep 'm.yaml compile=onnxruntime')")
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    rm = sub.add_parser("rm", parents=[common], help="remove entries by key (a unique prefix will do) or --all",
                        description="Remove entries despite their read-only mode (entries are read-only so that "
                                    "no tool modifies a cached artifact in place). --all empties the cache: "
                                    "every entry and every other part qbuild keeps there; files qbuild did not "
                                    "make are left, and so is anything in use.")
    rm.add_argument("keys", nargs="*", metavar="KEY", help="an entry's key, or a unique prefix of it")
    rm.add_argument("--all", action="store_true", help="remove everything qbuild keeps in the cache directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``qbuild cache ...``; returns the exit code (CacheError's when damage was found or a removal failed)."""
    ns = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from qbuild.store import default_cache_dir

    root = Path(os.path.abspath(getattr(ns, "cache_dir", None) or default_cache_dir()))
    as_json = getattr(ns, "json", False)
    try:
        if not root.is_dir():
            raise CacheError(f"no cache directory at {root}", hint="give --cache-dir DIR or set QBUILD_CACHE")
        return {"ls": _ls, "du": _du, "verify": _verify, "gc": _gc, "rm": _rm}[ns.command](ns, root, as_json)
    except QBuildError as exc:
        from qbuild.cli import _fail

        return _fail(exc, as_json, prog="qbuild cache")
    except KeyboardInterrupt:
        print("qbuild cache: interrupted; the cache is consistent (a removal cut short is finished later)",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _ls(ns: argparse.Namespace, root: Path, as_json: bool) -> int:
    from qbuild.store.maintenance import entries, human_size

    infos = entries(root)
    if as_json:
        print(json.dumps({"root": str(root), "entries": [e.to_json() for e in infos]}))
        return 0
    print(f"qbuild cache: {len(infos)} entries in {root}")
    print(f"  {'stage':<9} {'key':<14} {'size':>10}  {'created':<16}  {'last use':<16}  needed by")
    for e in infos:
        print(f"  {e.stage:<9} {e.key[:12]:<14} {human_size(e.size):>10}  {_when(e.created):<16}  "
              f"{_when(e.last_use):<16}  {', '.join(e.needed_by) or '-'}")
    return 0


def _du(ns: argparse.Namespace, root: Path, as_json: bool) -> int:
    from qbuild.store.maintenance import human_size, usage

    u = usage(root)
    if as_json:
        print(json.dumps(u))
        return 0
    print(f"qbuild cache: {human_size(u['total'])} in {root}")
    for stage, s in sorted(u["stages"].items()):
        print(f"  {stage:<10} {human_size(s['bytes']):>10}  {s['entries']} entries")
    for part, n in u["parts"].items():
        if n:
            print(f"  {part:<10} {human_size(n):>10}")
    return 0


def _verify(ns: argparse.Namespace, root: Path, as_json: bool) -> int:
    from qbuild.store.maintenance import verify

    findings, cleaned, checked = verify(root)
    if as_json:
        print(json.dumps({"checked": checked, "damaged": [f.__dict__ for f in findings], "cleaned": cleaned}))
    else:
        print(f"qbuild cache verify: {checked} entries checked from their bytes, {len(findings)} damaged")
        for f in findings:
            print(f"  {f.what}: {f.problem} ({'removed' if f.removed else 'in use, not removed'})")
        for c in cleaned:
            print(f"  {c}: left by a dead process, removed")
    if findings:
        print(f"qbuild cache: error: {len(findings)} damaged; the next build rebuilds the removed entries",
              file=sys.stderr)
        return CacheError.exit_code
    return 0


def _gc(ns: argparse.Namespace, root: Path, as_json: bool) -> int:
    from qbuild.store.maintenance import gc, human_size, parse_age, parse_size

    max_size = parse_size(ns.max_size) if ns.max_size is not None else None
    older = parse_age(ns.older_than) if ns.older_than is not None else None
    report = gc(root, max_size=max_size, older_than=older, keep=ns.keep, dry_run=ns.dry_run)
    if as_json:
        print(json.dumps({"dry_run": ns.dry_run, **report.to_json()}))
        return 0
    verb = "would remove" if ns.dry_run else "removed"
    print(f"qbuild cache gc: {verb} {len(report.removed)} ({human_size(report.before - report.after)}); "
          f"{human_size(report.before)} -> {human_size(report.after)}; {report.kept} entries kept for --keep")
    for item in report.removed:
        print(f"  {verb} {item.name}  {human_size(item.size)}  last used {_when(item.last_use)}")
    for name in report.skipped:
        print(f"  skipped {name}: in use (being built or read)")
    if max_size is not None and report.after > max_size:
        print(f"  note: still over {human_size(max_size)}: the rest is kept or in use")
    return 0


def _rm(ns: argparse.Namespace, root: Path, as_json: bool) -> int:
    from qbuild.store.maintenance import rm

    if ns.all == bool(ns.keys):
        raise CacheError("qbuild cache rm takes KEY... or --all (not both, not neither)")
    removed, skipped = rm(root, ns.keys, everything=ns.all)
    out: dict[str, Any] = {"removed": removed, "skipped": skipped}
    if as_json:
        print(json.dumps(out))
    else:
        for name in removed:
            print(f"  removed {name}")
        for name in skipped:
            print(f"  skipped {name}: in use (being built or read)")
    if skipped:
        print(f"qbuild cache: error: {len(skipped)} in use, not removed; retry when the build is done",
              file=sys.stderr)
        return CacheError.exit_code
    return 0

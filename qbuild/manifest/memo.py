"""A memo of composed configurations, so a fully cached build does not start Hydra.

The memo key is the digest of everything Hydra reads: the manifest path, the overrides, the bytes of
every config file on the search path (the manifest's directory and ``qbuild/conf``) and the versions
of qbuild, hydra-core and omegaconf. Configurations that call resolvers (``${oc.env:...}``,
``${now:...}``) depend on more than files and are never memoised; resolvers in Hydra's own settings
(``hydra/`` groups: launchers, sweepers) never reach the job's configuration and do not prevent it.

A memo file holds ``{"memo": MEMO_FORMAT, "key": ..., "sha256": ..., "config": ...}``, ``sha256`` being
the digest of the key and the canonical JSON of the configuration: an edited or damaged memo does not
match and is ignored (the configuration is composed again and the memo rewritten).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_SUFFIXES = (".yaml", ".yml", ".toml")
_SKIP_DIRS = {"cache", "outputs", "multirun", "node_modules", "__pycache__"}
_MAX_FILES = 500
_RESOLVER = re.compile(r"\$\{\s*[\w.]+\s*:")
MEMO_FORMAT = 2


def _config_files(directory: Path) -> list[Path] | None:
    files: list[Path] = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        files += [Path(root) / n for n in sorted(names) if n.endswith(_SUFFIXES)]
        if len(files) > _MAX_FILES:
            return None
    return files


def memo_key(path: Path, overrides: Sequence[str]) -> str | None:
    """Digest of the composition's inputs, or None when it must not be memoised."""
    from importlib import metadata

    import qbuild

    if any("${" in o for o in overrides):
        return None
    h = hashlib.sha256()
    versions = [qbuild.__version__] + [metadata.version(d) for d in ("hydra-core", "omegaconf")]
    h.update(json.dumps([str(path), list(overrides), versions]).encode())
    for directory in (path.parent, Path(qbuild.__file__).parent / "conf"):
        files = _config_files(directory)
        if files is None:
            return None
        for f in files:
            data = f.read_bytes()
            hydra_settings = "hydra" in f.relative_to(directory).parts[:-1]
            if not hydra_settings and _RESOLVER.search(data.decode("utf-8", "replace")):
                return None
            h.update(f"\0{f}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def _digest(key: str, config: Any) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{key}\0{text}".encode()).hexdigest()


def load(memo_dir: Path, key: str) -> dict[str, Any] | None:
    """The memoised configuration for ``key``; None when absent, unreadable, or its digest does not match."""
    try:
        data = json.loads((memo_dir / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("memo") != MEMO_FORMAT or data.get("key") != key:
        return None
    config = data.get("config")
    if not isinstance(config, dict) or data.get("sha256") != _digest(key, config):
        return None
    return config


def save(memo_dir: Path, key: str, config: dict[str, Any]) -> None:
    """Write atomically, with its digest; a memo that cannot be written is simply not written."""
    tmp = memo_dir / f"{key}.{os.getpid()}.tmp"
    try:
        memo = {"memo": MEMO_FORMAT, "key": key, "sha256": _digest(key, config), "config": config}
        memo_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(memo, sort_keys=True))
        os.replace(tmp, memo_dir / f"{key}.json")
    except (OSError, TypeError, ValueError):
        with contextlib.suppress(OSError):
            tmp.unlink()

"""Adapter names -> ``lora_ids`` for a program built with ``model.adapters`` (issue 15): ``base`` is 0, the
adapters 1..n in the manifest's order, as the export recorded them in ``adapters.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from qbuild.errors import RunError

ADAPTERS_FILE = "adapters.json"
BASE = "base"


def known_adapters(export_dir: Path | None) -> list[str]:
    """``["base", name 1, ...]`` of an export (``["base"]`` when it was built without adapters)."""
    path = None if export_dir is None else Path(export_dir) / ADAPTERS_FILE
    if path is None or not path.is_file():
        return [BASE]
    rows = sorted(json.loads(path.read_text(encoding="utf-8"))["adapters"], key=lambda r: r["id"])
    return [BASE, *(r["name"] for r in rows)]


def adapter_ids(known: Sequence[str], names: Sequence[str], prompts: int) -> list[int] | None:
    """The id of each prompt's adapter (``known``: the names by id, :func:`known_adapters`): one name per prompt,
    or one for all; None when no name is given."""
    if not names:
        return None
    if len(names) not in (1, prompts):
        raise RunError(f"{len(names)} --adapter names for {prompts} prompts; give one per prompt, or one for all")
    unknown = [n for n in names if n not in known]
    if unknown:
        why = "" if len(known) > 1 else " (this build has no model.adapters)"
        raise RunError(f"unknown adapter {unknown[0]!r}; known: {', '.join(known)}{why}",
                       hint="name an adapter of the manifest's model.adapters, or base for the base model")
    ids = [list(known).index(n) for n in names]
    return ids * prompts if len(ids) == 1 else ids

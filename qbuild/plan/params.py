"""Frozen stage params: what a stage's ``run()`` receives, and what its key is the digest of.

A stage resolves the manifest (and the machine) once, at plan time, into a frozen dataclass. Every
field is part of the key unless it is declared with :func:`unkeyed`, which is for values that cannot
change the output: where a file lies (its content is keyed elsewhere), a timeout, a thread count of
a measurement. ``run()`` gets that object and its upstream entries, never the manifest, so it cannot
act on a value its key does not cover.

The code that shapes an output is keyed too: a stage names the qbuild source files of its recipe
(:func:`code_digest`), digested through the stat cache, so editing a recipe rebuilds what it made
without anyone bumping a version number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qbuild.store import StatCache

_PACKAGE = Path(__file__).resolve().parent.parent


def unkeyed(default: Any = dataclasses.MISSING, *, why: str) -> Any:
    """A params field that is not part of the key (``why``: why it cannot change the output)."""
    return dataclasses.field(default=default, metadata={"key": False, "why": why})


def keyed(obj: Any) -> Any:
    """The JSON form of ``obj`` with its unkeyed fields left out (recursively)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: keyed(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("key", True)}
    return _plain(obj, keyed)


def as_json(obj: Any) -> Any:
    """The JSON form of ``obj``, every field included (for records and ``plan --explain``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return _plain(obj, as_json)


def _plain(obj: Any, rec: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): rec(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rec(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def freeze(value: Any) -> Any:
    """Lists -> tuples and dicts -> sorted tuples of pairs, so params stay hashable and immutable."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


# --- recipe code ----------------------------------------------------------------------------------


@cache
def code_files(patterns: tuple[str, ...]) -> tuple[Path, ...]:
    """qbuild source files matching ``patterns`` (globs relative to the package), sorted; each pattern
    must match at least one file (a renamed module must not silently drop out of a key)."""
    found: set[Path] = set()
    for pattern in patterns:
        matched = [p for p in _PACKAGE.glob(pattern) if p.is_file() and p.suffix == ".py"]
        if not matched:
            raise RuntimeError(f"recipe code pattern {pattern!r} matches no file under {_PACKAGE}")
        found.update(matched)
    return tuple(sorted(found))


def code_digest(patterns: Iterable[str], stats: StatCache) -> dict[str, str]:
    """``{relative path: sha256}`` of the recipe's source files (stat-cached: unchanged files are not read)."""
    return {p.relative_to(_PACKAGE).as_posix(): stats.digest(p) for p in code_files(tuple(sorted(patterns)))}


# --- which manifest values a stage's params come from ---------------------------------------------


class Recorder:
    """A read-only view of a manifest (or one of its groups) that records every leaf read, by dotted key.

    The planner resolves each stage through one, so it knows exactly which manifest values a stage's
    params came from: its plan reasons name those keys, and the key-property test walks the schema
    against them.
    """

    __slots__ = ("_obj", "_path", "_reads")

    def __init__(self, obj: Any, path: str = "", reads: dict[str, Any] | None = None) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", {} if reads is None else reads)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        path = f"{self._path}.{name}" if self._path else name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return Recorder(value, path, self._reads)
        self._reads[path] = as_json(value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a manifest is read-only")


def recording(m: Any) -> tuple[Any, dict[str, Any]]:
    """``(view of m that records reads, the reads)``."""
    reads: dict[str, Any] = {}
    return Recorder(m, "", reads), reads

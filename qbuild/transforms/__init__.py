"""Registry of module rewrites applied to the PyTorch model before export.

A transform is a function ``apply(model) -> dict`` that rewrites ``model`` in place and returns a
JSON-able report. Built-in transforms are listed in ``_REGISTRY`` as ``name -> ("module:function",
version)`` and imported only when applied, so reading names and versions never imports torch.
Other packages add transforms through the entry-point group ``qbuild.transforms``
(``name = "package.module:function"``); their version is the function's ``version`` attribute
(an int, default 1), which needs the plugin module imported. A built-in's code is keyed with qbuild's
own source files; a plugin's lies outside them, so :func:`transform_sources` keys its module's source.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from qbuild.errors import ManifestError, QBuildError, TransformError, one_line

ENTRY_POINT_GROUP = "qbuild.transforms"

#: name -> ("module:function", version); the version is reported, the code itself is keyed (recipe code)
_REGISTRY: dict[str, tuple[str, int]] = {
    "custom_rmsnorm": ("qbuild.transforms.custom_ops:apply_custom_rmsnorm", 1),
    "kv_cache": ("qbuild.transforms.kv_cache:apply", 1),
}


def _plugins() -> dict[str, Any]:
    """Entry points of the ``qbuild.transforms`` group by name (built-ins shadow plugins)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in _REGISTRY}


def known_transforms() -> list[str]:
    """Names of all registered transforms, built-in and plugin, sorted."""
    return sorted({*_REGISTRY, *_plugins()})


def _unknown(name: str) -> ManifestError:
    known = known_transforms()
    return ManifestError(
        f"transforms.apply: unknown transform {name!r}; known: {', '.join(known) if known else '(none)'}",
        key="transforms.apply",
    )


def _resolve(name: str) -> tuple[Callable[[Any], dict[str, Any]], int]:
    """The transform function and its version; imports its module."""
    if name in _REGISTRY:
        target, version = _REGISTRY[name]
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr), version
    ep = _plugins().get(name)
    if ep is None:
        raise _unknown(name)
    fn = ep.load()
    return fn, int(getattr(fn, "version", 1))


def transform_sources(names: Sequence[str]) -> dict[str, str]:
    """sha256 of the source file of each named plugin transform (editing a plugin re-exports without a
    version bump); built-ins are covered by the export stage's recipe code."""
    import hashlib
    import inspect
    from pathlib import Path

    out = {}
    for name in names:
        if name in _REGISTRY:
            continue
        try:
            source = inspect.getsourcefile(_resolve(name)[0])
        except TypeError:  # a builtin or C function: no source to read
            source = None
        out[name] = hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else "no-source"
    return out


def transform_versions(names: Sequence[str]) -> dict[str, int]:
    """Version of each named transform (built-ins without importing anything heavy)."""
    return {name: _REGISTRY[name][1] if name in _REGISTRY else _resolve(name)[1] for name in names}


def apply_transforms(model: Any, names: Sequence[str]) -> list[dict[str, Any]]:
    """Apply the named transforms to ``model`` in order; one report per transform."""
    resolved = [(name, *_resolve(name)) for name in names]  # unknown names fail before any rewrite
    reports = []
    for name, fn, version in resolved:
        try:
            result = fn(model)
        except QBuildError:
            raise
        except Exception as exc:
            raise TransformError(f"transform {name!r} failed: {one_line(exc)}") from exc
        reports.append({"name": name, "version": version, **(result or {})})
    return reports

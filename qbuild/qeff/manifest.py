"""The manifest behind a QEFF model: a plain mapping, written as YAML and composed like any manifest file.

Every call of a QEFF model composes this manifest (Hydra, the schema's validation) and builds it with
:func:`qbuild.api.build`, so a notebook and ``qbuild MANIFEST`` share one cache and one set of keys. To
compose, the YAML is written to ``<cache>/api/<name>-<digest>.yaml`` (its path is no part of any key).
Keyword arguments are checked here: an unknown one, or a QEfficient one that qbuild does not support
yet, raises :class:`~qbuild.errors.ManifestError` naming it; nothing is passed through unchecked.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import ManifestError
from qbuild.manifest.validate import suggest

if TYPE_CHECKING:
    from qbuild.manifest import ComposedManifest

HEADER = "# written by qbuild's Python API (model.manifest.save); build it with: qbuild {path}\n"


class ApiManifest:
    """The manifest equivalent to a QEFF model's calls so far. ``save(path)`` writes it as YAML;
    ``qbuild PATH`` then builds exactly what the API built (same keys, same cache entries)."""

    def __init__(self, data: Mapping[str, Any], *, arguments: Mapping[str, str] | None = None) -> None:
        self._data = copy.deepcopy(dict(data))
        self._data.setdefault("defaults", ["_self_"])
        #: manifest key -> the keyword argument that set it (errors name the argument)
        self.arguments = dict(arguments or {})

    @property
    def name(self) -> str:
        return str(self._data.get("name") or "model")

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the manifest's mapping (``defaults`` list included)."""
        return copy.deepcopy(self._data)

    def to_yaml(self) -> str:
        """The manifest as YAML (keys in a fixed order, so equal manifests give equal text)."""
        import yaml

        class Dumper(yaml.SafeDumper):  # mappings as blocks, lists of scalars inline: [32, 128]
            pass

        def flow_list(dumper: yaml.SafeDumper, value: list[Any]) -> Any:
            flow = all(not isinstance(v, (dict, list)) for v in value)
            return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

        Dumper.add_representer(list, flow_list)
        return yaml.dump(self._data, Dumper=Dumper, sort_keys=False, default_flow_style=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the manifest as YAML to ``path`` (``.yaml``, ``.yml``); returns the path."""
        out = Path(path).expanduser()
        if out.suffix not in (".yaml", ".yml"):
            raise ManifestError(f"manifest.save: {out}: write a .yaml or .yml file", key="path")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(HEADER.format(path=out.name) + self.to_yaml(), encoding="utf-8")
        return out

    def compose(self, cache: Path, overrides: Sequence[str] = (), *, write: bool = True) -> ComposedManifest:
        """Compose through Hydra and validate, as ``qbuild`` composes a file; a bad value names the keyword
        argument that set it."""
        from qbuild.manifest import compose

        text = self.to_yaml()
        path = Path(cache) / "api" / f"{_safe(self.name)}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        try:
            return compose(path, list(overrides), memo_dir=Path(cache) / "compose", memo_write=write)
        except ManifestError as e:
            raise self._named(e) from None

    def _named(self, e: ManifestError) -> ManifestError:
        argument = next((a for k, a in self.arguments.items() if e.key and (e.key == k or e.key.startswith(k + "."))),
                        None)
        if argument is None:
            return e
        return ManifestError(f"{argument}: {e.message}", key=argument, hint=e.hint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiManifest) and other._data == self._data

    def __hash__(self) -> int:
        return hash(self.to_yaml())

    def __repr__(self) -> str:
        return f"ApiManifest({self.name!r})\n{self.to_yaml()}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:80] or "model"


def set_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating the levels."""
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def check_kwargs(where: str, given: Mapping[str, Any], accepted: Iterable[str],
                 not_yet: Mapping[str, Any] = {}) -> None:  # noqa: B006 (read only)
    """Refuse an unknown keyword argument (with the closest accepted name) and a QEfficient one that qbuild
    does not support yet unless it has QEfficient's default value (which asks for nothing)."""
    accepted = sorted(set(accepted))
    for name, value in given.items():
        if name in not_yet:
            if _same(value, not_yet[name]):
                continue
            raise ManifestError(f"{where}: {name}={value!r} is not supported by qbuild yet",
                                key=name, hint=f"leave {name} at its default ({not_yet[name]!r})")
        if name not in accepted:
            raise ManifestError(f"{where}: unknown keyword argument {name!r}{suggest(name, accepted)}",
                                key=name, hint=f"{where} takes: {', '.join(accepted)}")


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def check_type(where: str, name: str, value: Any, kinds: tuple[type, ...], what: str) -> None:
    """Refuse a value of the wrong type, naming the argument (bool is not an int here)."""
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise ManifestError(f"{where}: {name} must be {what}, got {value!r}", key=name)


def int_list(where: str, name: str, value: Any) -> list[int]:
    """An int or a non-empty list of ints as a list (``seq_len=32`` or ``[32, 128]``)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ManifestError(f"{where}: {name} must be an int or a non-empty list of ints, got {value!r}", key=name)
    for v in values:
        check_type(where, name, v, (int,), "an int or a list of ints")
    return values

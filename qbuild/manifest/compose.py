"""Compose a manifest (YAML or TOML) with Hydra, then validate it into a :class:`Manifest`.

The search path is: the manifest's own directory (its local groups win), then the groups shipped in
``qbuild/conf`` (``pkg://qbuild.conf``), added by the Hydra SearchPathPlugin in
``hydra_plugins/qbuild_searchpath`` (or by a ``hydra.searchpath`` override when that plugin is not
installed). A TOML manifest is registered in Hydra's ConfigStore and composed the same way, so
defaults and overrides behave identically. Hydra and OmegaConf are imported lazily; nothing here
imports torch, transformers or onnx.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from qbuild.errors import ManifestError
from qbuild.manifest import memo
from qbuild.manifest.schema import Manifest
from qbuild.manifest.validate import moved_key_error, suggest, to_manifest

SHIPPED_CONF = "pkg://qbuild.conf"
_PLUGIN = "hydra_plugins.qbuild_searchpath.QBuildSearchPathPlugin"
_SUFFIXES = (".yaml", ".yml", ".toml")
_LOCK = threading.Lock()  # Hydra's state (GlobalHydra, ConfigStore) is process-global
_COUNTER = itertools.count()


@dataclass(frozen=True)
class ComposedManifest:
    """A composed manifest: the validated ``manifest`` and the plain ``config`` it came from."""

    manifest: Manifest
    config: dict[str, Any]  # resolved, plain containers, no ``hydra`` key
    source: Path  # the resolved manifest file
    name: str  # manifest.name, or the file's stem


def compose(
    manifest_path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    memo_dir: Path | None = None,
    memo_write: bool = True,
) -> ComposedManifest:
    """Compose ``manifest_path`` with Hydra ``overrides`` and validate it.

    With ``memo_dir``, a configuration composed before from identical inputs is reused without
    starting Hydra (``qbuild.manifest.memo``); ``memo_write=False`` only reads the memo.
    Raises :class:`ManifestError` with one clear message for every bad input.
    """
    path = _resolve(manifest_path)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    key = memo.memo_key(path, overrides) if memo_dir is not None else None
    config = memo.load(memo_dir, key) if memo_dir is not None and key is not None else None
    if config is None:
        _parse_overrides(overrides)  # syntax errors name the override, before Hydra starts
        data = None if path.suffix == ".yaml" else _read_data(path)
        with _LOCK:
            config = _compose_locked(path, data, overrides)
    manifest = to_manifest(config)  # validated before it is memoised: bad input is never remembered
    if memo_dir is not None and key is not None and memo_write:
        memo.save(memo_dir, key, config)
    return ComposedManifest(manifest=manifest, config=config, source=path, name=manifest.name or path.stem)


def to_yaml(config: dict[str, Any]) -> str:
    """The composed config as YAML, for ``--cfg`` printing."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config))


# --- inputs ---------------------------------------------------------------------------------------


def _resolve(manifest_path: str | os.PathLike[str]) -> Path:
    path = Path(manifest_path).expanduser().absolute()
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise ManifestError(f"manifest {what}: {path}", hint="pass the path of a .yaml or .toml manifest")
    if path.suffix not in _SUFFIXES:
        raise ManifestError(f"manifest {path}: unsupported file type {path.suffix!r}; use .yaml or .toml")
    return path.resolve()


def _read_data(path: Path) -> dict[str, Any]:
    """Parse a ``.toml`` or ``.yml`` manifest into a plain dict (``.yaml`` is read by Hydra itself)."""
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            with path.open("rb") as f:
                return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ManifestError(f"{path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}); a manifest is a UTF-8 TOML file") from None
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except yaml.YAMLError as e:
        raise _yaml_error(e, path) from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}); a manifest is a UTF-8 YAML file") from None
    except (OmegaConfBaseException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ManifestError(f"{path}: not a manifest: {first[:200]}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level")
    return data  # type: ignore[return-value]


def _parse_overrides(overrides: list[str]) -> None:
    """Check each override's syntax with Hydra's parser; errors name the override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    grammar = "overrides use Hydra's grammar: key=value, group=option, +key=value, ~key"
    for text in overrides:
        try:
            ov = parser.parse_override(text)
        except Exception as e:  # OverrideParseException
            detail = [
                ln for ln in str(e).splitlines() if not ln.startswith(("See https", "Error parsing override"))
            ]
            raise ManifestError(
                f"override {text!r}: invalid syntax ({'; '.join(detail) or type(e).__name__})", hint=grammar
            ) from None
        if not ov.key_or_group:
            raise ManifestError(f"override {text!r}: invalid syntax (no key before '=')", hint=grammar)
        if ov.is_sweep_override():
            raise ManifestError(
                f"override {text!r}: a sweep cannot be composed into one manifest",
                key=ov.key_or_group,
                hint="write a list as key=[a,b], or a string containing ',' as key='a,b'",
            )


def _schema_groups() -> frozenset[str]:
    return frozenset(k for k, tp in get_type_hints(Manifest).items() if is_dataclass(tp))


def _hydra_overrides(overrides: list[str], loader: Any) -> list[str]:
    """Rewrite plain ``key=value`` to ``++key=value`` so keys absent from the composed config work.

    ``verify.seq_len=8`` should work although the manifest never mentions ``verify`` (the schema
    supplies the default), and an unknown key should reach the validator (with its did-you-mean)
    rather than fail as a Hydra struct error. Group overrides (``model=x``) are left alone.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    groups = _schema_groups()
    out = []
    for text, ov in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        key = ov.key_or_group
        is_group = key in groups or "/" in key or bool(loader.get_group_options(key))
        plain = ov.type is OverrideType.CHANGE and ov.package is None and not ov.is_hydra_override()
        out.append("++" + text.lstrip() if plain and not is_group else text)
    if not _plugin_active():
        out.append(f"hydra.searchpath=[{SHIPPED_CONF}]")
    return out


def _plugin_active() -> bool:
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(SearchPathPlugin)}
    return _PLUGIN in found


# --- Hydra ----------------------------------------------------------------------------------------


@contextmanager
def _hydra(config_dir: Path) -> Iterator[Any]:
    """Initialise Hydra on ``config_dir``; yields the config loader. Restores any outer Hydra state."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobRuntime

    outer = GlobalHydra.instance().hydra  # e.g. a running @hydra.main app (a sweep)
    job_name = JobRuntime().get("name")  # initialising Hydra renames the job; the app's name stays
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None, job_name="qbuild"):
            yield GlobalHydra.instance().config_loader()
    finally:
        GlobalHydra.instance().hydra = outer
        JobRuntime().set("name", job_name)


def _compose_locked(path: Path, data: dict[str, Any] | None, overrides: list[str]) -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    config_name = path.stem
    if data is not None:  # TOML / .yml: a primary config in the ConfigStore, under a unique name
        config_name = f"__qbuild_manifest_{next(_COUNTER)}__"
        try:
            ConfigStore.instance().store(name=config_name, node=data)
        except Exception as e:  # e.g. a TOML datetime, which OmegaConf cannot hold
            raise ManifestError(f"{path}: unsupported content: {str(e).splitlines()[0]}") from None
    try:
        with _hydra(path.parent) as loader:
            try:
                cfg = hydra_compose(config_name=config_name, overrides=_hydra_overrides(overrides, loader))
                return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
            except ManifestError:
                raise
            except Exception as e:
                err = _translate(e, path, loader)
                raise (moved_key_error(err.key) if err.key else None) or err from None
    finally:
        if data is not None:
            ConfigStore.instance().repo.pop(f"{config_name}.yaml", None)


# --- errors ---------------------------------------------------------------------------------------


def _translate(e: Exception, path: Path, loader: Any) -> ManifestError:
    """One clear ManifestError for anything Hydra, OmegaConf or PyYAML raised while composing."""
    import yaml
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        return _missing_option(e.missing_cfg_file, e.options, path, loader)
    if isinstance(e, yaml.YAMLError):
        return _yaml_error(e, path)
    if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
        first = str(e).splitlines()[0]
        return ManifestError(f"{e.full_key}: {first}", key=e.full_key)
    return _composition_error(e, path)


def _missing_option(missing: str, options: Sequence[str] | None, path: Path, loader: Any) -> ManifestError:
    group, _, option = missing.rpartition("/")
    key = group.replace("/", ".")
    if options is None:
        options = loader.get_group_options(group)
    if not options:
        near = suggest(group, sorted(_schema_groups()))
        return ManifestError(
            f"{key}: no config group '{group}' in {path.parent} or {SHIPPED_CONF}{near}", key=key
        )
    return ManifestError(
        f"{key}: unknown option '{option}'; available: {', '.join(options)}{suggest(option, options)}",
        key=key,
    )


def _yaml_error(e: Exception, path: Path) -> ManifestError:
    mark = getattr(e, "problem_mark", None)
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return ManifestError(f"{where}: invalid YAML: {problem}")


def _composition_error(e: Exception, path: Path) -> ManifestError:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = list(itertools.takewhile(lambda ln: not ln.startswith("Config search path"), lines))
    message = " ".join(lines) or type(e).__name__
    match = re.search(r"'([\w.\-/]+)'", message)
    key = match.group(1).replace("/", ".") if match else None
    return ManifestError(f"{path.name}: {message}", key=key)

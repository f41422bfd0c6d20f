"""Compose a manifest (YAML or TOML) with Hydra, then validate it into a :class:`Manifest`.

The search path is: the manifest's own directory (its local groups win), then the groups shipped in
``qbuild/conf`` (``pkg://qbuild.conf``), added by the Hydra SearchPathPlugin in
``hydra_plugins/qbuild_searchpath`` (or by a ``hydra.searchpath`` override when that plugin is not
installed). A TOML manifest is registered in Hydra's ConfigStore and composed the same way, so
defaults and overrides behave identically. Hydra and OmegaConf are imported lazily; nothing here
imports torch, transformers or onnx. Before Hydra reads anything, the manifest, the group files of its
directory it selects and the overrides are held to the limits of ``qbuild.manifest.limits`` (size, nodes,
depth), so hostile input fails fast; a composition the memo answers reads none of them.
"""

from __future__ import annotations

import contextlib
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
from qbuild.manifest import limits, memo
from qbuild.manifest.schema import Manifest
from qbuild.manifest.validate import moved_key_error, suggest, to_manifest

SHIPPED_CONF = "pkg://qbuild.conf"
#: groups that are off unless chosen and that no manifest needs to list: ``finetune=lora`` selects one
#: without Hydra's ``+`` (other groups keep Hydra's rule, and its hint)
APPENDED_GROUPS = frozenset({"finetune"})
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
    path = _path(manifest_path)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    key = memo.memo_key(path, overrides) if memo_dir is not None else None
    config = memo.load(memo_dir, key) if memo_dir is not None and key is not None else None
    if config is None:
        choices = _parse_overrides(overrides)  # syntax errors name the override, before Hydra starts
        data = _read_checked(path, choices)
        with _LOCK:
            config = _compose_locked(path, data, overrides)
    try:
        manifest = to_manifest(config)  # validated before it is memoised: bad input is never remembered
    except ManifestError as e:
        raise limits.clip_error(e) from None
    if memo_dir is not None and key is not None and memo_write:
        memo.save(memo_dir, key, config)
    return ComposedManifest(manifest=manifest, config=config, source=path, name=manifest.name or path.stem)


def to_yaml(config: dict[str, Any]) -> str:
    """The composed config as YAML, for ``--cfg`` printing."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config))


# --- inputs ---------------------------------------------------------------------------------------


def _resolve(manifest_path: str | os.PathLike[str]) -> Path:
    """The manifest's resolved path, its content (and the group files it selects) held to the limits of
    ``qbuild.manifest.limits``: what a sweep calls before Hydra reads the manifest."""
    path = _path(manifest_path)
    _read_checked(path, [])
    return path


def _read_checked(path: Path, choices: Sequence[tuple[str, Any]]) -> dict[str, Any] | None:
    """Hold the manifest and the group files that it and the group ``choices`` select to the limits; the
    parsed data of a ``.toml`` or ``.yml`` manifest (None for ``.yaml``, which Hydra reads itself)."""
    text = limits.read_text(path, "YAML") if path.suffix == ".yaml" else None
    if text is not None:
        limits.check_yaml(path, text)
    data = None if text is not None else _read_data(path)
    limits.check_group_files(path, text, data, choices)
    return data


def _path(manifest_path: str | os.PathLike[str]) -> Path:
    path = Path(manifest_path).expanduser().absolute()
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise ManifestError(f"manifest {what}: {path}", hint="pass the path of a .yaml or .toml manifest")
    if path.suffix not in _SUFFIXES:
        raise ManifestError(f"manifest {path}: unsupported file type {path.suffix!r}; use .yaml or .toml")
    return path.resolve()


def _read_data(path: Path) -> dict[str, Any]:
    """Parse a ``.toml`` or ``.yml`` manifest into a plain dict (``.yaml`` is read by Hydra itself), within
    the limits of ``qbuild.manifest.limits``."""
    if path.suffix == ".toml":
        return _read_toml(path)
    import io

    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    text = limits.read_text(path, "YAML")
    limits.check_yaml(path, text)
    try:
        data = OmegaConf.to_container(OmegaConf.load(io.StringIO(text)), resolve=False)
    except yaml.YAMLError as e:
        raise _yaml_error(e, path) from None
    except (OmegaConfBaseException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ManifestError(f"{path}: not a manifest: {limits.clip(first, 200)}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level")
    return data  # type: ignore[return-value]


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    text = limits.read_text(path, "TOML")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path}: invalid TOML: {limits.clip(str(e))}") from None
    except RecursionError:
        raise ManifestError(f"{path}: arrays or tables nested too deep; a manifest nests at most "
                            f"{limits.MAX_DEPTH} deep") from None
    limits.check_data(path, data)
    return data


def _parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Check each override's length, depth and syntax (Hydra's parser) before Hydra starts; errors name the
    override. Returns (key or group, value) of each ``key=value`` override (group choices among them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    grammar = "overrides use Hydra's grammar: key=value, group=option, +key=value, ~key"
    choices = []
    for text in overrides:
        limits.check_override(text)
        shown = limits.clip(text, 100)
        try:
            ov = parser.parse_override(text)
        except Exception as e:  # OverrideParseException; a RecursionError past the depth check
            detail = [
                ln for ln in str(e).splitlines() if not ln.startswith(("See https", "Error parsing override"))
            ]
            raise ManifestError(
                f"override {shown!r}: invalid syntax ({limits.clip('; '.join(detail) or type(e).__name__)})",
                hint=grammar,
            ) from None
        if not ov.key_or_group:
            raise ManifestError(f"override {shown!r}: invalid syntax (no key before '=')", hint=grammar)
        if ov.is_sweep_override():
            raise _sweep_error(text, ov.key_or_group)
        if not ov.is_delete():
            with contextlib.suppress(Exception):  # a value Hydra's functions cannot evaluate: Hydra says so
                choices.append((ov.key_or_group, ov.value()))
    return choices


def _sweep_error(text: str, key: str) -> ManifestError:
    """A sweep (``key=a,b``, ``range()``, ``choice()``) outside ``-m``: say how to sweep; suggest a list only
    where the key holds one, and quoting only where it holds a string."""
    shown = limits.clip(text, 100)
    kind = _kind(_schema_type(key))
    alt = {"list": f"; for one build with a list value write {key}=[a,b]",
           "str": f"; for one build with a value containing ',' quote it: {key}='a,b'"}.get(kind or "", "")
    return ManifestError(
        f"override {shown!r}: a sweep (one build per value) cannot be composed into one configuration",
        key=key, hint=f"sweep with `qbuild MANIFEST -m {shown}` (qbuild plan and run take one configuration){alt}",
    )


def _schema_type(key: str) -> Any:
    """The schema's type hint of a dotted key; None when the schema does not define it."""
    tp: Any = Manifest
    for part in key.split("."):
        hints = get_type_hints(tp) if is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _kind(tp: Any) -> str | None:
    """``mapping``, ``list`` or ``str`` for a type hint (None for other types)."""
    from typing import get_origin

    origin = get_origin(tp)
    if is_dataclass(tp) or tp is dict or origin is dict:
        return "mapping"
    if tp is list or origin is list:
        return "list"
    return "str" if tp is str or (tp is not None and str in getattr(tp, "__args__", ())) else None


def _schema_groups() -> frozenset[str]:
    return frozenset(k for k, tp in get_type_hints(Manifest).items() if is_dataclass(tp))


def _hydra_overrides(overrides: list[str], loader: Any, config_name: str | None = None) -> list[str]:
    """Rewrite plain ``key=value`` to ``++key=value`` so keys absent from the composed config work.

    ``verify.seq_len=8`` should work although the manifest never mentions ``verify`` (the schema
    supplies the default), and an unknown key should reach the validator (with its did-you-mean)
    rather than fail as a Hydra struct error. Group overrides (``model=x``) are left alone, except those
    of :data:`APPENDED_GROUPS` that the manifest's defaults list does not select (``finetune=lora`` on a
    manifest without ``finetune``): they are appended (``+finetune=lora``), as Hydra requires.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    groups = _schema_groups()
    out = []
    for text, ov in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        key = ov.key_or_group
        is_group = key in groups or "/" in key or bool(loader.get_group_options(key))
        plain = ov.type is OverrideType.CHANGE and ov.package is None and not ov.is_hydra_override()
        if is_group and not ov.is_delete():
            _check_choice(text, key, ov.value(), loader)
        if plain and key in APPENDED_GROUPS and config_name is not None and key not in _selected_groups(loader,
                                                                                                      config_name):
            text = "+" + text.lstrip()
        out.append("++" + text.lstrip() if plain and not is_group else text)
    if not _plugin_active():
        out.append(f"hydra.searchpath=[{SHIPPED_CONF}]")
    return out


def _selected_groups(loader: Any, config_name: str) -> set[str]:
    """The config groups the primary config's own defaults list selects (no overrides applied)."""
    from hydra.types import RunMode

    defaults = loader.compute_defaults_list(config_name, [], RunMode.RUN).defaults
    return {d.config_path.partition("/")[0] for d in defaults if d.config_path and "/" in d.config_path}


def _check_choice(text: str, group: str, value: Any, loader: Any) -> None:
    """A config group override names options (``seq=buckets``, ``transforms=[a,b]``); refuse other values
    (Hydra's own messages name no key: "must be a string or a list. Got int")."""
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return
    options = loader.get_group_options(group.replace(".", "/"))
    key = group.replace("/", ".")
    raise ManifestError(
        f"override {limits.clip(text, 100)!r}: {key} is a config group; its value names an option "
        f"({', '.join(options) or 'none found'}), got {limits.clip(repr(value), 100)}",
        key=key, hint=f"set a key of the group as {key}.KEY=VALUE",
    )


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
                hydra_overrides = _hydra_overrides(overrides, loader, config_name)
                cfg = hydra_compose(config_name=config_name, overrides=hydra_overrides)
                _check_group_choices(loader, config_name, hydra_overrides)
                return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
            except ManifestError:
                raise
            except Exception as e:
                err = _translate(e, path, loader, overrides=overrides, data=data)
                raise (moved_key_error(err.key) if err.key else None) or err from None
    finally:
        if data is not None:
            ConfigStore.instance().repo.pop(f"{config_name}.yaml", None)


def _check_group_choices(loader: Any, config_name: str, hydra_overrides: list[str]) -> None:
    """Options of one group composed together (``transforms=[kv_cache,none]``) would drop all but the last."""
    from hydra.types import RunMode

    from qbuild.manifest.validate import check_group_options

    defaults = loader.compute_defaults_list(config_name, hydra_overrides, RunMode.RUN).defaults
    check_group_options([d.config_path for d in defaults if d.config_path])


# --- errors ---------------------------------------------------------------------------------------


def _translate(e: Exception, path: Path, loader: Any, *, overrides: Sequence[str] = (),
               data: dict[str, Any] | None = None) -> ManifestError:
    """One clear ManifestError for anything Hydra, OmegaConf or PyYAML raised while composing: it names the
    dotted key where the exceptions (or the schema) tell it, and is at most ``limits.MAX_MESSAGE`` long.
    ``data``: the manifest's own config when it is not a ``.yaml`` file Hydra read."""
    return limits.clip_error(_translated(e, path, loader, overrides, data))


def _translated(e: Exception, path: Path, loader: Any, overrides: Sequence[str],
                data: dict[str, Any] | None) -> ManifestError:
    import yaml
    from hydra.errors import MissingConfigException
    from omegaconf.errors import GrammarParseError, OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        return _missing_config(e.missing_cfg_file, e.options, path, loader, overrides, str(e))
    if isinstance(e, yaml.YAMLError):
        return _yaml_error(e, path)
    chain = _chain(e)
    keyed = next((c for c in chain if isinstance(c, OmegaConfBaseException) and getattr(c, "full_key", None)), None)
    origin = _override_in(str(e), overrides)
    if keyed is not None:
        key = str(keyed.full_key)
        first = str(keyed).strip().splitlines()[0] if str(keyed).strip() else type(keyed).__name__
        if isinstance(keyed, GrammarParseError):
            return ManifestError(f"{key}: unfinished or invalid interpolation{origin} ({limits.clip(first)})",
                                 key=key, hint="an interpolation is ${other.key}; write a literal '${' as '\\${'")
        if "Cannot merge" in first:
            return _merge_error(key, getattr(keyed, "object_type", None), origin)
        return ManifestError(f"{key}: {limits.clip(first)}{origin}", key=key)
    if any("Cannot merge" in str(c) for c in chain):
        found = _type_conflict(_config_of(str(e), path, data))
        if found is not None:
            key, want, value = found
            return ManifestError(f"{key}: expected a {want} (the configuration it merges onto has one), got "
                                 f"{limits.clip(repr(value), 100)} (in {path.name})", key=key)
    return _composition_error(e, path)


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from (at most 8)."""
    chain: list[BaseException] = []
    seen: BaseException | None = e
    while seen is not None and len(chain) < 8 and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _override_in(message: str, overrides: Sequence[str]) -> str:
    """`` (override 'x=1')`` when Hydra's ``message`` names one of ``overrides``, else ``""``."""
    match = re.search(r"Error merging override (\S.*)$", message.strip().splitlines()[0] if message.strip() else "")
    if not match:
        return ""
    text = match.group(1)
    original = next((o for o in overrides if text in (o, "++" + o.lstrip())), text)
    return f" (override {limits.clip(original, 100)!r})"


def _merge_error(key: str, object_type: Any, origin: str) -> ManifestError:
    """A mapping merged onto a list or the reverse: which one the key holds (the schema says; else OmegaConf)."""
    want = _kind(_schema_type(key)) or {dict: "mapping", list: "list"}.get(object_type)
    got = {"mapping": "list", "list": "mapping"}.get(want or "")
    what = f"expected a {want}, got a {got}" if got else "a mapping and a list cannot be merged"
    return ManifestError(f"{key}: {what}{origin}", key=key)


def _config_of(message: str, path: Path, data: dict[str, Any] | None) -> tuple[str, Any]:
    """(key prefix, plain config) of the config Hydra's ``message`` names ("In 'model/x': ..."): the manifest,
    or a group file of its directory or of ``qbuild/conf``; ("", None) when not found."""
    match = re.match(r"In '([^']+)'", message.strip())
    name = match.group(1) if match else path.stem
    if name == path.stem or name.startswith("__qbuild_manifest_"):
        return "", data if data is not None else limits.load_yaml(path)
    conf = Path(__file__).resolve().parent.parent / "conf"
    for root in (path.parent, conf):
        file = root / f"{name}.yaml"
        if file.is_file() and file.stat().st_size <= limits.MAX_FILE_BYTES:
            prefix = name.rpartition("/")[0].replace("/", ".")
            return prefix, limits.load_yaml(file)
    return "", None


def _type_conflict(where: tuple[str, Any]) -> tuple[str, str, Any] | None:
    """The first key of a config holding a list where the schema has a mapping, or the reverse."""
    todo = [where]
    while todo:
        prefix, config = todo.pop(0)
        if not isinstance(config, dict):
            continue
        for k, v in config.items():
            if k == "defaults" and not prefix:
                continue
            key = f"{prefix}.{k}" if prefix else str(k)
            want = _kind(_schema_type(key))
            got = "mapping" if isinstance(v, dict) else "list" if isinstance(v, list) else None
            if want in ("mapping", "list") and got and want != got:
                return key, want, v
            if got == "mapping":
                todo.append((key, v))
    return None


def _missing_config(missing: str, options: Sequence[str] | None, path: Path, loader: Any,
                    overrides: Sequence[str], message: str) -> ManifestError:
    group, _, option = missing.rpartition("/")
    match = re.match(r"In '([^']+)'", message.strip())
    name = match.group(1) if match else path.stem
    within = path.name if name == path.stem or name.startswith("__qbuild") else f"{name}.yaml"
    from_override = any(missing in o or (group and o.lstrip("+~").startswith(group)) for o in overrides)
    parts = missing.split("/")
    if not from_override and (not group or ".." in parts or "" in parts):
        return ManifestError(
            f"defaults: entry {limits.clip(missing, 100)!r} in {within}: no such config in {path.parent} or "
            f"{SHIPPED_CONF}; an entry is 'group: option' (e.g. model: tiny-llama), _self_, or the name of a "
            "config in the manifest's directory",
            key="defaults",
        )
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
    # the mark's own name is "<file>" for text parsed from memory: always name the manifest
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return ManifestError(f"{where}: invalid YAML: {limits.clip(problem)}")


def _composition_error(e: Exception, path: Path) -> ManifestError:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = list(itertools.takewhile(lambda ln: not ln.startswith("Config search path"), lines))
    message = re.sub(r"^In '[^']*': ", "", " ".join(lines)) or type(e).__name__
    match = re.search(r"'([\w.\-/]+)'", message)
    key = match.group(1).replace("/", ".") if match else None
    return ManifestError(f"{path.name}: {message}", key=key)

"""Limits on manifest inputs, checked before Hydra or OmegaConf read them, so hostile input fails fast.

A manifest file (and each group file of the manifest's directory it selects) holds at most
:data:`MAX_FILE_BYTES` bytes and :data:`MAX_NODES` nodes (keys, values and collections, aliases
expanded: a "billion laughs" fails at the alias that crosses the limit), nested at most
:data:`MAX_DEPTH` mappings and lists deep. YAML is checked on PyYAML's event stream, which neither
recurses nor expands aliases. A command-line override holds at most :data:`MAX_OVERRIDE_CHARS`
characters, nested at most :data:`MAX_DEPTH` deep. Error messages quote at most :data:`MAX_SHOWN`
characters of a value and are cut to :data:`MAX_MESSAGE` characters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qbuild.errors import ManifestError

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a manifest holds settings; large data (weights, prompts) is named by path
MAX_NODES = 10_000  # composing 10,000 nodes takes Hydra about 1 s; real manifests hold under 200
MAX_DEPTH = 32  # mappings and lists; the schema's deepest key (compile.qaic.extra_flags.X) is 4 deep
MAX_OVERRIDE_CHARS = 4096  # Hydra's override parser is quadratic in a list's length (10,000 items: 4 s)
MAX_GROUP_FILES = 64  # group files of the manifest's directory checked for one composition
MAX_SHOWN = 300  # characters of a value (or an override) quoted in a message
MAX_MESSAGE = 500  # characters of a whole message

_FILE_HINT = "a manifest holds settings; name large data (weights, prompt files) by path"


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... ({len(text):,} characters)"


def clip_error(err: ManifestError) -> ManifestError:
    """``err`` with its message (and key and hint) cut to a sane length: its start names the key, its end
    often the valid choices."""
    if len(err.message) > MAX_MESSAGE:
        cut = len(err.message) - MAX_MESSAGE + 60
        err.message = f"{err.message[:300]} ...[{cut:,} characters cut]... {err.message[-(MAX_MESSAGE - 360):]}"
        err.args = (err.message,)
    if err.key is not None and len(err.key) > MAX_SHOWN:
        err.key = err.key[:MAX_SHOWN]
    if err.hint is not None and len(err.hint) > MAX_SHOWN:
        err.hint = clip(err.hint)
    return err


# --- files ----------------------------------------------------------------------------------------


def read_text(path: Path, kind: str) -> str:
    """The text of a manifest or group file, refused when it is over :data:`MAX_FILE_BYTES` or not UTF-8."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
            size = max(len(raw), path.stat().st_size)
    except OSError as e:
        raise ManifestError(f"{path}: cannot read it: {e.strerror or e}") from None
    if size > MAX_FILE_BYTES:
        raise ManifestError(f"{path}: {size:,} bytes; a manifest file holds at most {MAX_FILE_BYTES:,} bytes (1 MiB)",
                            hint=_FILE_HINT)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}); a manifest is a UTF-8 {kind} file") from None


def check_yaml(path: Path, text: str) -> None:
    """Fail fast on YAML that is too deep or too large once its aliases are expanded (or self-referencing),
    walking PyYAML's event stream: no recursion, no alias expansion, stopping at the first event over a limit."""
    import yaml

    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (expanded nodes, nesting depth) of its node
    stack: list[list[Any]] = []  # open collections: [anchor, expanded nodes so far, depth below]
    total = 0
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        for ev in yaml.parse(text, Loader=loader):
            where = f"{path}:{ev.start_mark.line + 1}"
            alias = None
            if isinstance(ev, yaml.CollectionStartEvent):
                total += 1
                _check_size(total, len(stack) + 1, where, None)
                stack.append([ev.anchor, 1, 0])
                continue
            if isinstance(ev, yaml.ScalarEvent):
                nodes, depth = 1, 0
                total += 1
                if ev.anchor:
                    anchors[ev.anchor] = (1, 0)
            elif isinstance(ev, yaml.AliasEvent):
                alias = ev.anchor
                nodes, depth = _alias(ev.anchor, anchors, stack, where)
                total += nodes
            elif isinstance(ev, yaml.CollectionEndEvent):
                anchor, nodes, below = stack.pop()  # its nodes were counted as they came
                depth = below + 1
                if anchor:
                    anchors[anchor] = (nodes, depth)
            else:
                continue
            _check_size(total, len(stack) + depth, where, alias)
            if stack:
                stack[-1][1] += nodes
                stack[-1][2] = max(stack[-1][2], depth)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ManifestError(f"{path}{line}: invalid YAML: {clip(problem)}") from None


def _alias(anchor: str, anchors: dict[str, tuple[int, int]], stack: list[list[Any]], where: str) -> tuple[int, int]:
    if anchor in anchors:
        return anchors[anchor]
    if any(frame[0] == anchor for frame in stack):
        raise ManifestError(f"{where}: alias *{clip(anchor, 60)} refers to a collection that contains it "
                            "(a recursive alias); a manifest cannot hold a cycle")
    raise ManifestError(f"{where}: alias *{clip(anchor, 60)} refers to no anchor (&{clip(anchor, 60)}) before it")


def _check_size(total: int, depth: int, where: str, alias: str | None) -> None:
    via = f" (at alias *{clip(alias, 60)})" if alias else ""
    if total > MAX_NODES:
        raise ManifestError(f"{where}: more than {MAX_NODES:,} nodes (keys, values, lists and mappings, aliases "
                            f"expanded){via}; a manifest file holds at most {MAX_NODES:,}", hint=_FILE_HINT)
    if depth > MAX_DEPTH:
        raise ManifestError(f"{where}: mappings and lists nested {depth} deep{via}; a manifest nests at most "
                            f"{MAX_DEPTH} deep")


def check_data(path: Path, data: Any) -> None:
    """The same node and depth limits on parsed data (a TOML manifest), without recursion."""
    total = 0
    todo: list[tuple[Any, int, str]] = [(data, 1, "")]
    while todo:
        value, depth, key = todo.pop()
        total += 1
        if isinstance(value, (dict, list)):
            _check_size(total, depth, f"{path}{': ' + clip(key, 100) if key else ''}", None)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            todo.extend((v, depth + 1, f"{key}.{k}" if key else str(k)) for k, v in items)
        elif total > MAX_NODES:
            _check_size(total, depth, str(path), None)


# --- the group files a manifest selects -----------------------------------------------------------


def check_group_files(path: Path, text: str | None, data: Any, group_overrides: Sequence[tuple[str, Any]]) -> None:
    """Check the group files of the manifest's directory that its defaults lists (followed through the group
    files they select) and the group overrides (``model=x``) select, before Hydra reads them. The groups
    shipped in ``qbuild/conf`` are qbuild's own files and are not checked."""
    root = path.parent
    if data is None and text is not None and "defaults" in text:
        data = load_yaml(text)
    todo = list(_selected(root, "", data.get("defaults") if isinstance(data, dict) else None))
    for group, value in group_overrides:
        todo += _options(root, group, value)
    seen: set[Path] = set()
    while todo and len(seen) < MAX_GROUP_FILES:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        body = read_text(file, "YAML")
        check_yaml(file, body)
        if "defaults" in body:
            loaded = load_yaml(body)
            group = file.parent.relative_to(root.resolve()).as_posix()
            defaults = loaded.get("defaults") if isinstance(loaded, dict) else None
            todo += _selected(root, "" if group == "." else group, defaults)


def load_yaml(source: str | Path) -> Any:
    """Plain data of YAML text or of a file; None when it is not valid YAML (Hydra then names the problem)."""
    import yaml

    text = source.read_text(encoding="utf-8", errors="replace") if isinstance(source, Path) else source

    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (a safe loader)
    except yaml.YAMLError:
        return None  # Hydra reports it, naming the file


def _selected(root: Path, group: str, defaults: Any) -> Iterator[Path]:
    """Files under ``root`` named by a defaults list of a config in ``group`` (Hydra's relative and absolute
    group names, ``override``/``optional`` and ``@package`` forms)."""
    if not isinstance(defaults, list):
        return
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_":
            yield from _options(root, group, entry)
        elif isinstance(entry, dict):
            for k, v in entry.items():
                name = str(k).removeprefix("override ").removeprefix("optional ").split("@")[0].strip()
                g = name[1:] if name.startswith("/") else f"{group}/{name}".strip("/")
                yield from _options(root, g, v)


def _options(root: Path, group: str, value: Any) -> Iterator[Path]:
    for option in value if isinstance(value, list) else [value]:
        if not isinstance(option, str) or "${" in option or len(option) > 255:
            continue
        file = (root / group / f"{option}.yaml") if group else root / f"{option}.yaml"
        try:
            file = file.resolve()
            inside = file.is_relative_to(root.resolve()) and file.is_file()
        except (OSError, ValueError):
            continue
        if inside:
            yield file


# --- overrides ------------------------------------------------------------------------------------


def check_override(text: str) -> None:
    """Refuse an override longer than :data:`MAX_OVERRIDE_CHARS` or nested deeper than :data:`MAX_DEPTH`,
    before Hydra's parser reads it."""
    shown = clip(text, 80)
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ManifestError(f"override {shown!r}: {len(text):,} characters; an override holds at most "
                            f"{MAX_OVERRIDE_CHARS:,}", hint="put long values in the manifest file")
    key = text.split("=", 1)[0].lstrip("+~").strip()
    depth = deepest = 0
    quote = ""
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    deepest += key.count(".") + 1  # the mappings that hold the key, as in a manifest file
    if deepest > MAX_DEPTH:
        raise ManifestError(f"override {shown!r}: mappings and lists nested {deepest} deep; a manifest nests at "
                            f"most {MAX_DEPTH} deep")

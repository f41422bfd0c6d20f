"""What plan-time checks know about a manifest's model, read without importing transformers or torch.

* Model types: transformers' registry (``CONFIG_MAPPING_NAMES``, read from its source files as text and
  ``ast``) plus qbuild's own (class-level ``model_type = "..."`` in ``qbuild/models``).
* Config values: ``model.config`` for ``init: random`` (the architecture's defaults are known only by
  importing transformers, so only values present are checked), else the checkpoint's ``config.json``.
* The kv_cache families (``FAMILIES`` of ``qbuild/transforms/kv_cache.py``, a module that imports torch).

:func:`check_model` applies the rules that need these facts; each failure is a :class:`ManifestError`
whose ``key`` is the full dotted key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from qbuild.errors import ManifestError, QBuildError
from qbuild.manifest.schema import Manifest

_PACKAGE = Path(__file__).resolve().parents[1]  # qbuild/
_CLOSE = re.compile(r"^[)\]}].*$", re.M)

#: a config value under the names architectures use for it (transformers' attribute_map), first wins
ALIASES: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads"),
    "intermediate_size": ("intermediate_size", "n_inner"),
    "head_dim": ("head_dim",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
}
#: encoders whose position ids start after the padding id (``pad_token_id + 1``, 2 by default)
_PADDED_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                               "longformer", "mpnet"})


# --- model types ----------------------------------------------------------------------------------


def _statements(text: str, name: str) -> list[str]:
    """The source of each top-level statement of ``text`` that starts with ``name`` (assignment or call)."""
    out = []
    for m in re.finditer(rf"^{re.escape(name)}\b.*$", text, re.M):
        line = m.group(0)
        if sum(map(line.count, "([{")) == sum(map(line.count, ")]}")):
            out.append(line)
            continue
        end = _CLOSE.search(text, m.end())
        out.append(text[m.start(): end.end() if end else len(text)])
    return out


@cache
def _mapping_sources() -> tuple[str, ...]:
    """The statements that build transformers' ``CONFIG_MAPPING_NAMES`` (empty: transformers not found)."""
    try:
        spec = importlib.util.find_spec("transformers")  # a top-level package: located, not imported
    except (ImportError, ValueError):
        return ()
    for location in (spec.submodule_search_locations or []) if spec else []:
        auto = Path(location) / "models" / "auto"
        found = []
        for name in ("auto_mappings.py", "configuration_auto.py"):  # transformers >= 5.x, and the older layout
            try:
                found += _statements((auto / name).read_text(encoding="utf-8"), "CONFIG_MAPPING_NAMES")
            except OSError:
                continue
        if found:
            return tuple(found)
    return ()


def _is_str(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


@cache
def transformers_model_types() -> frozenset[str]:
    """The keys of transformers' ``CONFIG_MAPPING_NAMES``: ``("llama", "LlamaConfig")`` pairs and dict entries."""
    names: set[str] = set()
    for source in _mapping_sources():
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple) and len(node.elts) == 2 and all(map(_is_str, node.elts)):
                names.add(node.elts[0].value)  # type: ignore[attr-defined]
            elif isinstance(node, ast.Dict):
                names.update(k.value for k, v in zip(node.keys, node.values, strict=True)  # type: ignore[union-attr]
                             if _is_str(k) and _is_str(v))
    return frozenset(names)


@cache
def qbuild_model_types() -> frozenset[str]:
    """Model types qbuild implements itself: ``model_type = "..."`` in a class body under ``qbuild/models``."""
    names: set[str] = set()
    for path in sorted((_PACKAGE / "models").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if not re.search(r"^\s+model_type\s*=\s*['\"]", text, re.M):
            continue
        for cls in (n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ClassDef)):
            for stmt in cls.body:
                if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                        and stmt.targets[0].id == "model_type" and isinstance(stmt.value, ast.Constant)
                        and isinstance(stmt.value.value, str)):
                    names.add(stmt.value.value)
    return frozenset(names)


def is_known_model_type(name: str) -> bool | None:
    """Whether transformers or qbuild knows model type ``name``; None when transformers is not installed.

    A literal ``("name", `` entry in the mapping's source answers without parsing (the no-op build stays
    fast); anything else is decided on the parsed registry."""
    sources = _mapping_sources()
    if not sources:
        return None
    if re.fullmatch(r"[\w.\-]+", name) and any(f'("{name}",' in s or f'"{name}":' in s for s in sources):
        return True
    return name in qbuild_model_types() or name in transformers_model_types()


def close_model_types(name: str, n: int = 3) -> list[str]:
    """The known model types closest to ``name`` (lower-case ones: model types, not class names); a class
    name is first stripped of its head (``LlamaForCausalLM`` -> ``llama``)."""
    known = sorted(t for t in transformers_model_types() | qbuild_model_types() if t == t.lower())
    word = re.sub(r"(For[A-Z]\w*|LMHeadModel|Model|Config)$", "", name).lower() or name.lower()
    return difflib.get_close_matches(word, known, n=n, cutoff=0.6)


@cache
def kv_cache_families() -> frozenset[str]:
    """Model types the kv_cache transform rewrites (its ``FAMILIES`` table, read without importing torch)."""
    try:
        text = (_PACKAGE / "transforms" / "kv_cache.py").read_text(encoding="utf-8")
        tree = ast.parse("\n".join(_statements(text, "FAMILIES")))
    except (OSError, SyntaxError):
        return frozenset()
    return frozenset(k.value for n in ast.walk(tree) if isinstance(n, ast.Dict)  # type: ignore[union-attr]
                     for k in n.keys if _is_str(k))


# --- config values --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """The model type and config values known at plan time, and where they come from."""

    model_type: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    where: str = ""  # "model.config" (manifest keys) or the checkpoint's config.json

    def get(self, name: str) -> tuple[str, Any] | None:
        """(the key used, its value) for config value ``name`` under any of its :data:`ALIASES`; None if unset."""
        for alias in ALIASES.get(name, (name,)):
            if self.values.get(alias) is not None:
                return alias, self.values[alias]
        return None

    def show(self, key: str, value: Any) -> str:
        """``model.config.key=value``, or ``key=value in /path/config.json``."""
        return f"{self.where}.{key}={value}" if self.where == "model.config" else f"{key}={value} in {self.where}"


def model_facts(m: Manifest) -> ModelFacts:
    """``model.config`` for ``init: random``; else the checkpoint's config.json (nothing when unreadable:
    the load stage reports a missing checkpoint)."""
    spec = m.model
    if spec.init == "random":
        return ModelFacts(spec.architecture, spec.config, "model.config")
    path = _checkpoint_config(m)
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        return ModelFacts()
    model_type = data.get("model_type")
    return ModelFacts(model_type if isinstance(model_type, str) else None, data, str(path))


def _checkpoint_config(m: Manifest) -> Path | None:
    from qbuild.stages.load import _hub_snapshot, resolve_path  # light: qbuild's package import loads it anyway

    try:
        if m.model.path is not None:
            return resolve_path(m.model.path) / "config.json"
        if m.model.name is not None:
            snap = _hub_snapshot(m.model.name, m.model.revision)
            return snap / "config.json" if snap is not None else None
    except (QBuildError, OSError, ValueError):
        return None
    return None


# --- rules ----------------------------------------------------------------------------------------


def check_model(m: Manifest) -> None:
    """The rules that need the model's type or config values."""
    if m.model.init == "random":
        _check_architecture(m.model.architecture)
        _check_config_values(m.model.config)
    else:
        _check_checkpoint_keys(m)
    facts = model_facts(m)
    _check_positions(m, facts)
    _check_kv_cache(m, facts)


def _check_checkpoint_keys(m: Manifest) -> None:
    """A checkpoint's config.json is used as is: keys that only shape random weights would be dropped."""
    source = "model.path" if m.model.path is not None else "model.name"
    for key, is_set in (("model.config", bool(m.model.config)), ("model.architecture", bool(m.model.architecture))):
        if is_set:
            raise ManifestError(
                f"{key}: applies only with model.init=random; a checkpoint ({source}) is loaded with its own "
                "config.json as is", key=key, hint=f"drop {key}, or save a changed config with the checkpoint")


def _check_architecture(architecture: str | None) -> None:
    if not architecture or is_known_model_type(architecture) is not False:
        return
    close = close_model_types(architecture)
    near = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    own = ", ".join(sorted(qbuild_model_types()))
    raise ManifestError(
        f"model.architecture: unknown model type {architecture!r}{near}; valid: a transformers model_type "
        f"({len(transformers_model_types())} known, e.g. llama, gemma3_text, qwen3, bert) or qbuild's own ({own})",
        key="model.architecture")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_config_values(config: Mapping[str, Any]) -> None:
    """Sizes present in ``model.config`` are integers >= 1, and the head counts divide as attention needs."""
    facts = ModelFacts(None, config, "model.config")
    for name in ALIASES:
        got = facts.get(name)
        if got is not None and not isinstance(got[1], list) and not _positive_int(got[1]):  # lists: per layer
            key, value = got
            raise ManifestError(f"model.config.{key}: {value!r} is not a valid {name}; must be an integer >= 1",
                                key=f"model.config.{key}")
    hidden, heads, kv = facts.get("hidden_size"), facts.get("num_attention_heads"), facts.get("num_key_value_heads")
    if hidden and heads and facts.get("head_dim") is None and hidden[1] % heads[1]:
        raise ManifestError(
            f"model.config.{heads[0]}: {heads[1]} does not divide {facts.show(*hidden)}; the number of attention "
            f"heads must divide the hidden size ({_nearest_divisors(hidden[1], heads[1])})",
            key=f"model.config.{heads[0]}", hint="or set model.config.head_dim where the architecture has one")
    if heads and kv and heads[1] % kv[1]:
        raise ManifestError(
            f"model.config.{kv[0]}: {kv[1]} does not divide {facts.show(*heads)}; key/value heads are shared by "
            f"equal groups of query heads ({_nearest_divisors(heads[1], kv[1])})", key=f"model.config.{kv[0]}")
    layers, types = facts.get("num_hidden_layers"), config.get("layer_types")
    if layers and isinstance(types, list) and len(types) != layers[1]:
        raise ManifestError(f"model.config.layer_types: lists {len(types)} layers, but "
                            f"{facts.show(*layers)}; give one entry per layer", key="model.config.layer_types")


def _nearest_divisors(n: int, near: int) -> str:
    """``valid near 3: 2 or 4`` — the divisors of ``n`` nearest ``near`` (searched within 4096 steps)."""
    lo, hi = min(near, n), near + 1
    below = next((d for d in range(lo, max(lo - 4096, 0), -1) if n % d == 0), None)
    above = next((d for d in range(hi, min(hi + 4096, n + 1)) if n % d == 0), None)
    shown = " or ".join(str(d) for d in (below, above) if d is not None)
    return f"valid near {near}: {shown}" if shown else f"use a divisor of {n}"


def _check_positions(m: Manifest, facts: ModelFacts) -> None:
    """Buckets <= seq.ctx_len <= the model's max positions (for encoders: the largest bucket, plus the
    padding offset of RoBERTa-style position ids)."""
    got = facts.get("max_position_embeddings")
    if got is None or not _positive_int(got[1]) or not m.seq.lengths:
        return
    key, limit = got
    if m.model.task == "embedding":
        pad = facts.values.get("pad_token_id")
        pad = pad if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else 1
        offset = pad + 1 if facts.model_type in _PADDED_POSITIONS else 0
        longest = max(m.seq.lengths)
        if longest + offset > limit:
            extra = f" + {offset} (position ids start after the padding id)" if offset else ""
            raise ManifestError(
                f"seq.lengths: the longest bucket {longest}{extra} exceeds the model's positions "
                f"({facts.show(key, limit)}); each bucket must be <= {limit - offset}", key="seq.lengths")
        return
    if m.seq.ctx_len > limit:
        raise ManifestError(
            f"seq.ctx_len: {m.seq.ctx_len} exceeds the model's positions ({facts.show(key, limit)}); "
            f"must be <= {limit} (buckets <= seq.ctx_len <= max positions)", key="seq.ctx_len",
            hint=f"lower seq.ctx_len (and seq.lengths) to <= {limit}"
                 + (f", or raise model.config.{key}" if facts.where == "model.config" else ""))


def _check_kv_cache(m: Manifest, facts: ModelFacts) -> None:
    """kv_cache rewrites a causal LM of a family it knows."""
    if "kv_cache" not in m.transforms.apply:
        return
    what = f" ({facts.model_type})" if facts.model_type else ""
    if m.model.task != "causal_lm":
        raise ManifestError(
            f"transforms.apply: kv_cache adds a retained-state KV cache to a causal LM, but model.task is "
            f"{m.model.task}{what}; valid only with model.task=causal_lm", key="transforms.apply",
            hint="drop kv_cache (transforms=none) for an encoder, or use a causal LM")
    families = kv_cache_families()
    if facts.model_type and families and facts.model_type not in families:
        raise ManifestError(
            f"transforms.apply: kv_cache has no rewrite for model type {facts.model_type!r}; supported: "
            f"{', '.join(sorted(families))}", key="transforms.apply", hint="drop kv_cache (transforms=none)")


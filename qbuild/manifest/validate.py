"""Turn a composed config dict into a frozen, validated :class:`Manifest`.

``to_manifest`` walks the dataclasses of ``qbuild.manifest.schema`` generically: keys, types,
``choices`` and ``min`` / ``max`` metadata, finite floats (also inside free-form mappings such as
``model.config``). ``check_manifest`` then applies the cross-field rules, and those that need the
model's type or config values (``qbuild.manifest.model_facts``, without importing transformers or torch).
Every error is a :class:`ManifestError` whose ``key`` is the full dotted key.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import Field, fields, is_dataclass
from functools import cache
from typing import Any, Union, get_args, get_origin, get_type_hints

from qbuild.errors import ManifestError
from qbuild.manifest.adapters import check_adapters
from qbuild.manifest.model_facts import check_model
from qbuild.manifest.schema import Manifest

_NoneType = type(None)


def to_manifest(data: Mapping[str, Any]) -> Manifest:
    """Build a frozen :class:`Manifest` from a plain mapping, then apply :func:`check_manifest`."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"manifest: expected a mapping at the top level, got {_describe(data)}")
    manifest = _build(Manifest, data, "")
    check_manifest(manifest)
    return manifest


# --- messages -------------------------------------------------------------------------------------


def suggest(word: str, options: Sequence[str]) -> str:
    """``; did you mean 'x'?`` for the closest option, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _describe(value: Any) -> str:
    """``str 'abc'`` — the YAML-ish type name and the value."""
    kind = {bool: "bool", int: "int", float: "float", str: "str", _NoneType: "null"}.get(type(value))
    if kind is None:
        kind = "mapping" if isinstance(value, Mapping) else "list" if isinstance(value, list) else "value"
    return f"{kind} {value!r}" if value is not None else "null"


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or is_dataclass(tp):
        return "mapping"
    return {_NoneType: "null", Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


#: keys that were moved (old dotted key -> the message naming the new place), consulted before the
#: generic unknown-key message: one configuration per backend, so no key has two meanings
MOVED_KEYS: dict[str, str] = {
    "compile.num_cores": "moved; use compile.qaic.num_cores (Cloud AI 100 NSP cores) or "
                         "compile.onnxruntime.threads (ONNX Runtime threads)",
    "compile.graph_optimization": "moved to compile.onnxruntime.graph_optimization",
    "compile.quantize": "moved to compile.onnxruntime.quantize",
    "compile.session": "moved to compile.onnxruntime.session",
    "compile.mxfp6_matmul": "moved to compile.qaic.mxfp6_matmul",
    "compile.mxint8_kv_cache": "moved to compile.qaic.mxint8_kv_cache",
    "compile.num_devices": "moved to compile.qaic.num_devices",
}


def moved_key_error(key: str) -> ManifestError | None:
    """The error for a key listed in :data:`MOVED_KEYS` (or below one), naming its new place; else None."""
    base = key
    while base and base not in MOVED_KEYS:
        base = base.rpartition(".")[0]
    if not base:
        return None
    return ManifestError(f"{base}: {MOVED_KEYS[base]}", key=base)


def unknown_key_error(key: str, valid: Sequence[str]) -> ManifestError:
    """The error for a key that is not in its group's schema, with the valid keys and a suggestion."""
    moved = moved_key_error(key)
    if moved is not None:
        return moved
    parent, _, name = key.rpartition(".")
    where = f"'{parent}'" if parent else "the top level"
    return ManifestError(
        f"{key}: unknown key; valid keys in {where}: {', '.join(sorted(valid))}{suggest(name, valid)}",
        key=key,
    )


# --- the walker -----------------------------------------------------------------------------------


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and bad values raise."""
    by_name: dict[str, Field[Any]] = {f.name: f for f in fields(cls)}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = _join(prefix, str(name))
        if name not in by_name:
            raise unknown_key_error(key, list(by_name))
        meta = by_name[name].metadata
        kwargs[name] = _check_meta(_convert(hints[name], value, key), meta, key)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; return it (nested dataclasses built, ints widened to float)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, key)
    if tp is Any:
        return value
    if is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        return _build(tp, value, key)  # type: ignore[arg-type]
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        elem = get_args(tp)[0] if get_args(tp) else Any
        return [_convert(elem, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        bad = non_finite(value, key)
        if bad is not None:
            raise ManifestError(f"{bad[0]}: {bad[1]} is not a finite number; values here must be finite numbers "
                                "(they are keyed as JSON)", key=bad[0])
        return dict(value)
    return _convert_scalar(tp, value, key)


def _convert_union(tp: Any, value: Any, key: str) -> Any:
    args = get_args(tp)
    if value is None:
        if _NoneType in args:
            return None
        raise _type_error(key, tp, value)
    for arg in (a for a in args if a is not _NoneType):
        try:
            return _convert(arg, value, key)
        except ManifestError:
            continue
    raise _type_error(key, tp, value)


def _convert_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:  # an annotation this walker does not know: accept, the schema's own tests cover it
        ok = True
    if not ok:
        raise _type_error(key, tp, value)
    return value


def _type_error(key: str, tp: Any, value: Any) -> ManifestError:
    field_key = key.split("[", 1)[0]
    return ManifestError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}", key=field_key)


def non_finite(value: Any, key: str) -> tuple[str, float] | None:
    """(dotted key, value) of the first NaN or infinite float in ``value`` (through mappings and lists)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, value)
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = non_finite(v, f"{key}[{k}]" if isinstance(value, list) else f"{key}.{k}")
        if found is not None:
            return found
    return None


def _check_meta(value: Any, meta: Mapping[str, Any], key: str) -> Any:
    """Apply finiteness, ``choices`` and ``min`` / ``max`` (per element for lists)."""
    if isinstance(value, float) and not math.isfinite(value):
        lo, hi = meta.get("min"), meta.get("max")
        bound = "".join(f" {op} {b}" for op, b in ((">=", lo), ("<=", hi)) if b is not None)
        raise ManifestError(f"{key}: {value} is not a finite number; must be a finite number{bound}", key=key)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = [_show(c) for c in choices]
        raise ManifestError(
            f"{key}: {_show(value)!r} is not one of: {', '.join(shown)}{suggest(str(value), shown)}",
            key=key,
        )
    if "min" in meta or "max" in meta:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            _check_range(item, meta, where, key)
    return value


def _check_range(value: Any, meta: Mapping[str, Any], where: str, key: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if value is None or (lo is None or value >= lo) and (hi is None or value <= hi):
        return
    if lo is not None and hi is not None:
        bound = f"between {lo} and {hi}"
    else:
        bound = f">= {lo}" if lo is not None else f"<= {hi}"
    why = f" ({meta['why']})" if meta.get("why") else ""
    raise ManifestError(f"{where}: {value} is out of range; must be {bound}{why}", key=key)


# --- cross-field rules ----------------------------------------------------------------------------


def check_manifest(m: Manifest) -> None:
    """Rules that span several keys: model source, sequence lengths vs context, transform names, the model's
    type and config values (``model_facts``), exporter vs opset, verify seeds."""
    _check_model(m)
    _check_seq(m)
    _check_transforms(m)
    check_model(m)
    _check_pooling(m)
    _check_export(m)
    _check_verify(m)
    _check_cache(m)
    _check_name(m)
    _check_qaic(m)
    _check_finetune(m)
    _check_qnn(m)
    _check_ort(m)
    check_adapters(m)


MAX_NAME = 200


def _check_name(m: Manifest) -> None:
    """``name`` names a bundle directory (``--out DIR/<name>``) and is printed: short, one line, no slashes."""
    if len(m.name) > MAX_NAME:
        raise ManifestError(f"name: {len(m.name):,} characters; a name has at most {MAX_NAME}", key="name")
    bad = sorted({c for c in m.name if not c.isprintable() or c in "/\\"})
    if bad:
        shown = ", ".join(c.encode("unicode_escape").decode("ascii") if not c.isprintable() else c for c in bad)
        raise ManifestError(f"name: {shown} cannot be part of a name (it names the bundle directory and is "
                            "printed)", key="name")


def _check_cache(m: Manifest) -> None:
    """A remote URL that carries a secret is refused before the manifest is remembered anywhere."""
    if m.cache.remote:
        from qbuild.store.remote import url_problem

        problem = url_problem(m.cache.remote)
        if problem:
            raise ManifestError(f"cache.remote: {problem}", key="cache.remote")


def _check_qaic(m: Manifest) -> None:
    """``compile.qaic.device_group`` names distinct cards, one per ``compile.qaic.num_devices``."""
    q = m.compile.qaic
    if not q.device_group:
        return
    if len(set(q.device_group)) != len(q.device_group):
        raise ManifestError(f"compile.qaic.device_group: {q.device_group} names a card twice; list each QID once",
                            key="compile.qaic.device_group")
    if len(q.device_group) != q.num_devices:
        raise ManifestError(f"compile.qaic.device_group: {len(q.device_group)} cards {q.device_group} but "
                            f"compile.qaic.num_devices={q.num_devices}; set compile.qaic.num_devices="
                            f"{len(q.device_group)}", key="compile.qaic.device_group")


def _check_ort(m: Manifest) -> None:
    """``compile.onnxruntime.quantize_min_cosine`` measures a quantisation: without one there is nothing to measure."""
    o = m.compile.onnxruntime
    if o.quantize_min_cosine is not None and o.quantize == "none":
        raise ManifestError("compile.onnxruntime.quantize_min_cosine: applies to a quantisation (int8, int8_block or "
                            "int4), but quantize is none", key="compile.onnxruntime.quantize_min_cosine",
                            hint="set compile.onnxruntime.quantize=int8, int8_block or int4, or "
                                 "quantize_min_cosine=null")


def _check_qnn(m: Manifest) -> None:
    """``compile.qnn``: the argument extensions split, hold no flag qbuild sets, and
    ``compile.qnn.compilation_backend`` sets no key that has its own option (``qnn_command.check_manifest``)."""
    q = m.compile.qnn
    if q.converter_args_extension or q.context_binary_generator_args_extension or q.compilation_backend:
        from qbuild.backends.qnn_command import check_manifest

        check_manifest(m)


def _check_finetune(m: Manifest) -> None:
    """``finetune=lora`` trains a causal LM on ``finetune.dataset`` (its existence is checked at plan time)."""
    f = m.finetune
    if f.method == "none":
        return
    if not f.dataset:
        raise ManifestError("finetune.dataset: required with finetune.method=lora", key="finetune.dataset",
                            hint="set finetune.dataset=PATH: a JSONL file with a text field, or alpaca records "
                                 "(instruction, input, output)")
    if m.model.task != "causal_lm":
        raise ManifestError(f"finetune.method: lora trains a causal LM, but model.task is {m.model.task}",
                            key="finetune.method", hint="set finetune=none for this model")
    if not f.lora.target_modules:
        raise ManifestError("finetune.lora.target_modules: empty; name the Linear modules that get an adapter, "
                            "e.g. [q_proj,v_proj]", key="finetune.lora.target_modules")
    if not f.text_field:
        raise ManifestError("finetune.text_field: empty; name the field of the records holding the text",
                            key="finetune.text_field")


def _check_model(m: Manifest) -> None:
    sources = [
        key
        for key, is_set in (
            ("model.path", bool(m.model.path)),
            ("model.name", bool(m.model.name)),
            ("model.init=random", m.model.init == "random"),
        )
        if is_set
    ]
    how = (
        "set exactly one of model.path (a local save_pretrained directory), model.name (a hub id in "
        "the local cache) or model.init=random (with model.architecture), e.g. the override "
        "'model=tiny-llama'"
    )
    if not sources:
        raise ManifestError(f"model: missing model source; {how}", key="model")
    if len(sources) > 1:
        raise ManifestError(f"model: more than one model source ({', '.join(sources)}); {how}", key="model")
    if m.model.init == "random" and not m.model.architecture:
        raise ManifestError(
            "model.architecture: required with model.init=random (a transformers model_type, e.g. llama)",
            key="model.architecture",
        )


def _check_seq(m: Manifest) -> None:
    lengths, ctx = m.seq.lengths, m.seq.ctx_len
    if not lengths:
        raise ManifestError(
            "seq.lengths: must list at least one sequence length, e.g. [32]", key="seq.lengths"
        )
    over = [n for n in lengths if n > ctx]
    if over:
        raise ManifestError(
            f"seq.lengths: {lengths} exceeds seq.ctx_len={ctx} (too long: {', '.join(map(str, over))}); "
            "each length must be <= seq.ctx_len",
            key="seq.lengths",
        )
    if m.verify.seq_len > ctx:
        raise ManifestError(
            f"verify.seq_len: {m.verify.seq_len} is longer than seq.ctx_len={ctx}; must be <= seq.ctx_len",
            key="verify.seq_len",
        )


def _known_transforms() -> list[str]:
    try:
        from qbuild.transforms import known_transforms
    except ImportError:  # the transforms package is optional while it is being written
        return []
    return list(known_transforms())


def _check_transforms(m: Manifest) -> None:
    if not m.transforms.apply:
        return  # qbuild.transforms is imported only when a manifest names a transform
    known = _known_transforms()
    for i, name in enumerate(m.transforms.apply):
        if name == "none":
            raise ManifestError(
                f"transforms.apply[{i}]: 'none' is the transforms group option for no rewrites, not a transform; "
                f"list transform names only (known: {', '.join(known)}), or [] for none", key="transforms.apply")
        if name not in known:
            listed = ", ".join(known) if known else "(none registered)"
            raise ManifestError(
                f"transforms.apply[{i}]: unknown transform {name!r}; known: {listed}{suggest(name, known)}",
                key="transforms.apply",
            )
        if name in m.transforms.apply[:i]:
            raise ManifestError(f"transforms.apply[{i}]: {name} is listed twice; apply each transform once",
                                key="transforms.apply")


def check_group_options(defaults: Sequence[str]) -> None:
    """Group options composed together (``transforms=[kv_cache,none]``): each transforms option sets the
    whole ``transforms.apply`` list, so all but the last would be dropped. ``defaults``: the composed
    config paths in merge order (``transforms/kv_cache``, ...), from Hydra's defaults list."""
    chosen = [p.rpartition("/")[2] for p in defaults if p.rpartition("/")[0] == "transforms"]
    if len(chosen) < 2:
        return
    shown = f"transforms=[{','.join(chosen)}]"
    if "none" in chosen:
        others = ", ".join(c for c in chosen if c != "none")
        raise ManifestError(f"transforms: {shown}: 'none' cannot be combined with {others}; it means no rewrites",
                            key="transforms", hint=f"use transforms={others} alone, or transforms=none")
    raise ManifestError(f"transforms: {shown}: each option sets the whole transforms.apply list, so only the last "
                        f"({chosen[-1]}) would apply; choose one option", key="transforms",
                        hint="or list the rewrites in one key: transforms.apply=[custom_rmsnorm,kv_cache]")


def _check_pooling(m: Manifest) -> None:
    """A known pooling name, or ``module:function`` whose module is found and defines a suitable function."""
    from qbuild.transforms.pooling import check_method

    check_method(m.pooling.method)
    if m.model.task != "embedding" and (m.pooling.method not in ("auto", "none") or m.pooling.normalize):
        raise ManifestError(
            f"pooling.method: {m.pooling.method} pools encoder outputs, but model.task is {m.model.task}",
            key="pooling.method", hint="set model.task=embedding for an encoder, or drop the pooling override")


def _check_export(m: Manifest) -> None:
    """The dynamo exporter emits the opsets of torch's torchlib (18 and later) and needs onnxscript."""
    if m.export.exporter != "dynamo":
        return
    from qbuild.tasks.export_common import DYNAMO_MIN_OPSET

    if m.export.opset < DYNAMO_MIN_OPSET:
        top = next(f.metadata["max"] for f in fields(type(m.export)) if f.name == "opset")
        raise ManifestError(
            f"export.opset: {m.export.opset} is below what the dynamo exporter emits (its torchlib implements opset "
            f"{DYNAMO_MIN_OPSET} and later); with export.exporter=dynamo, export.opset must be between "
            f"{DYNAMO_MIN_OPSET} and {top}", key="export.opset",
            hint=f"set export.opset={DYNAMO_MIN_OPSET} or later, or export.exporter=legacy for older opsets")
    import importlib.util

    if importlib.util.find_spec("onnxscript") is None:
        raise ManifestError("export.exporter: the dynamo exporter needs the onnxscript package, which is not "
                            "installed; valid here: legacy", key="export.exporter",
                            hint="pip install onnxscript, or set export.exporter=legacy")


def _check_verify(m: Manifest) -> None:
    """Embedding verify seeds numpy's RandomState with ``verify.seed + bucket``, which must stay < 2**32."""
    top = 2**32 - 1
    if m.model.task == "embedding" and m.seq.lengths and m.verify.seed + max(m.seq.lengths) > top:
        raise ManifestError(
            f"verify.seed: {m.verify.seed} + the longest bucket {max(m.seq.lengths)} exceeds numpy's seed limit "
            f"2**32 - 1; must be <= {top - max(m.seq.lengths)}", key="verify.seed")

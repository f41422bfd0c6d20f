"""``model.adapters``: several LoRA adapters served from one program (issue 15 part 2), checked without torch.

Each entry is ``{name, path}``, a peft adapter directory (``adapter_config.json`` and
``adapter_model.safetensors`` / ``.bin``), or ``{name, seed}`` (``alpha`` optional), a random adapter shaped by
``model.lora``. Ids follow the list's order from 1; id 0 (``base``) is the base model. (A list, not a mapping:
the order is part of the program, and a mapping's order does not survive every serialisation.) The directory
checks (a LoRA adapter, one ``r`` and one set of ``target_modules`` for all) run at plan time
(:func:`read_adapter_config`); the weights are checked against the base model by the adapters stage.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.errors import ManifestError, PlanError

#: the name of id 0, the base model with zero LoRA weights
BASE = "base"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
#: the weight files of a peft adapter directory, in peft's order of preference
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save", "rank_pattern": "rank_pattern",
                "alpha_pattern": "alpha_pattern"}


def adapter_names(m: Any) -> tuple[str, ...]:
    """The adapters' names in id order (1..n)."""
    return tuple(str(a["name"]) for a in m.model.adapters)


def check_adapters(m: Any) -> None:
    """The shape of ``model.adapters`` and what it needs (a KV causal LM, the legacy exporter, no finetune)."""
    adapters = m.model.adapters
    if not adapters:
        return
    seen: set[str] = set()
    for i, entry in enumerate(adapters):
        name = _check_entry(i, entry)
        if name in seen:
            raise ManifestError(f"model.adapters[{i}]: the name {name!r} is given twice; names select adapters",
                                key="model.adapters")
        seen.add(name)
    needs = [("transforms.apply", "kv_cache" in m.transforms.apply and m.model.task == "causal_lm",
              "the adapters are served by the retained-state KV causal LM: add transforms=kv_cache"),
             ("finetune.method", m.finetune.method == "none", "finetune=lora merges its adapter into the weights; "
                                                              "use finetune=none with model.adapters"),
             ("export.exporter", m.export.exporter == "legacy", "the multi-LoRA graph is exported by the legacy "
                                                                "exporter: set export.exporter=legacy"),
             ("compile.qaic.use_onnx_subfunctions", not m.compile.qaic.use_onnx_subfunctions,
              "decoder layers as ONNX functions are not supported with adapters; set it to false")]
    for key, ok, why in needs:
        if not ok:
            raise ManifestError(f"model.adapters: {why} (see {key})", key="model.adapters")
    if any("seed" in a for a in adapters) and not m.model.lora.target_modules:
        raise ManifestError("model.lora.target_modules: empty; the random adapters of model.adapters need the "
                            "Linear modules they wrap, e.g. [q_proj, v_proj]", key="model.lora.target_modules")


def _check_entry(i: int, entry: Any) -> str:
    """One entry: ``{name, path}`` or ``{name, seed[, alpha]}``; its name."""
    key = f"model.adapters[{i}]"
    form = "{name: N, path: DIR} or {name: N, seed: S} (alpha optional)"
    if not isinstance(entry, Mapping):
        raise ManifestError(f"{key}: expected {form}, got {type(entry).__name__} {entry!r}", key="model.adapters")
    name = entry.get("name")
    if not isinstance(name, str) or name == BASE or not _NAME.fullmatch(name):
        why = "is the base model's name (id 0)" if name == BASE else "is not a valid name (letters, digits, _ . -)"
        raise ManifestError(f"{key}.name: {name!r} {why}", key="model.adapters")
    unknown = sorted(set(entry) - {"name", "path", "seed", "alpha"})
    if unknown or ("path" in entry) == ("seed" in entry) or ("path" in entry and "alpha" in entry):
        why = f"unknown keys {unknown}" if unknown else "give exactly one of path and seed"
        raise ManifestError(f"{key} ({name}): {why}; expected {form}", key="model.adapters")
    path, seed, alpha = entry.get("path"), entry.get("seed"), entry.get("alpha")
    if "path" in entry and (not isinstance(path, str) or not path):
        raise ManifestError(f"{key}.path ({name}): {path!r}; give a peft adapter directory", key="model.adapters")
    if "seed" in entry and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
        raise ManifestError(f"{key}.seed ({name}): must be an int in [0, 2**32), got {seed!r}", key="model.adapters")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise ManifestError(f"{key}.alpha ({name}): {alpha!r}; must be a number > 0", key="model.adapters")
    return name


@dataclass(frozen=True)
class AdapterConfig:
    """What the one-program export needs from a peft ``adapter_config.json``."""

    r: int
    alpha: float
    target_modules: tuple[str, ...]  # sorted
    weights: str  # the weight file's name
    base_model: str | None


def label(i: int, name: str) -> str:
    """How errors name the ``i``-th adapter: ``model.adapters[i] (name)``."""
    return f"model.adapters[{i}] ({name})"


def read_adapter_config(key: str, directory: Path) -> AdapterConfig:
    """Check that ``directory`` holds a peft LoRA adapter this export supports; its config (``key``: :func:`label`)."""
    hint = "point it at a directory written by PeftModel.save_pretrained() (adapter_config.json + weights)"
    if not directory.is_dir():
        raise PlanError(f"{key}: {directory} {'is not a directory' if directory.exists() else 'does not exist'} "
                        "(relative paths are taken from the current directory)", hint=hint)
    path = directory / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"{key}: {path}: not a peft adapter ({type(exc).__name__}: {exc})", hint=hint) from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise PlanError(f"{key}: {path}: not a LoRA adapter (peft_type {kind!r}); only LoRA adapters are served",
                        hint=hint)
    weights = next((f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise PlanError(f"{key}: {directory} has no adapter weights ({' or '.join(WEIGHT_FILES)})", hint=hint)
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise PlanError(f"{key}: {path}: {what} ({field}) is not supported by the one-program export",
                            hint="serve this adapter merged (finetune) or retrain it as plain LoRA")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise PlanError(f"{key}: {path}: target_modules {targets!r}; a list of module names is needed", hint=hint)
    return AdapterConfig(int(config.get("r", 8)), float(config.get("lora_alpha", 8)),
                         tuple(sorted(targets)), weights, config.get("base_model_name_or_path"))


def check_same_shape(configs: Mapping[str, tuple[int, tuple[str, ...], str]]) -> None:
    """All adapters share ``r`` and ``target_modules`` (``configs``: label -> (r, targets, where it is said))."""
    items = list(configs.items())
    first_name, (r0, t0, where0) = items[0]
    for name, (r, targets, where) in items[1:]:
        for what, a, b in (("r", r0, r), ("target_modules", list(t0), list(targets))):
            if a != b:
                raise PlanError(f"{name}: {what} {b} ({where}) differs from {what} {a} of "
                                f"{first_name} ({where0}); adapters served from one program share "
                                "r and target_modules", hint="serve adapters of one shape together, or retrain")

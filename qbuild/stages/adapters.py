"""adapters: the LoRA adapters of ``model.adapters``, checked against the base model and put in one entry.

In the graph only when ``model.adapters`` names some (after load; export and verify read its entry), so a
build without adapters keeps every key. A directory adapter is keyed by its files' sha256 (``adapter_config.json``
and its weights, never its path) and copied into the entry after its weights were matched with the base
model's Linear modules; a random adapter (``{seed: N}``) is made here, shaped by ``model.lora``, with
non-zero A and B (peft initialises B to zero, which would make every adapter the base model). Ids are the
list's order (1..n); 0 is the base model. The entry:
``<name>/`` per adapter (a peft adapter directory) and ``adapters.json`` (names in id order, r, scalings).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.manifest.adapters import check_same_shape, label, read_adapter_config
from qbuild.manifest.schema import Manifest
from qbuild.plan.keys import fingerprints
from qbuild.plan.params import unkeyed
from qbuild.stages.base import ModelRef, Resolved, Stage, StageContext
from qbuild.stages.load import resolve_model
from qbuild.store import StatCache

ADAPTERS_FILE = "adapters.json"


@dataclass(frozen=True)
class AdapterItem:
    """One adapter: random (``seed``, ``alpha``) or a directory (keyed by its files' digests)."""

    name: str
    seed: int | None = None
    alpha: float | None = None
    directory: str | None = unkeyed(None, why="an adapter's location; its files' sha256 key this stage")


@dataclass(frozen=True)
class AdaptersParams:
    """The base model, the adapters in id order (1..n) and the shape of the random ones."""

    model: ModelRef  # the base model as load gives it (no rewrites)
    adapters: tuple[AdapterItem, ...]
    r: int | None = None  # random adapters only (a directory's own config is keyed through its digest)
    target_modules: tuple[str, ...] = ()


def resolve_adapters(m: Manifest, stats: StatCache) -> tuple[AdaptersParams, dict[str, str]]:
    """The params and the digests of the directory adapters' files (``<name>/<file>``); checks that every
    directory holds a LoRA adapter and that all adapters share r and target_modules."""
    model, _tok = resolve_model(m)
    items, sources, shapes = [], {}, {}
    for i, entry in enumerate(m.model.adapters):
        name, key = str(entry["name"]), label(i, str(entry["name"]))
        if "path" in entry:
            directory = Path(entry["path"]).expanduser().resolve()
            config = read_adapter_config(key, directory)
            for f in ("adapter_config.json", config.weights):
                sources[f"{name}/{f}"] = stats.digest(directory / f)
            items.append(AdapterItem(name, directory=str(directory)))
            shapes[key] = (config.r, config.target_modules, str(directory / "adapter_config.json"))
        else:
            lora = m.model.lora
            alpha = float(entry["alpha"]) if entry.get("alpha") is not None else lora.alpha
            items.append(AdapterItem(name, int(entry["seed"]), alpha))
            shapes[key] = (lora.r, tuple(sorted(lora.target_modules)), "model.lora")
    check_same_shape(shapes)
    random = any(i.seed is not None for i in items)
    r, targets = (m.model.lora.r, tuple(sorted(m.model.lora.target_modules))) if random else (None, ())
    return AdaptersParams(model.untransformed(), tuple(items), r, targets), sources


class AdaptersStage(Stage):
    name = "adapters"
    upstream = ("load",)
    code = ("stages/adapters.py", "manifest/adapters.py", "tasks/kv_lora.py", "models/source.py")
    tools = ("torch", "transformers", "peft", "safetensors")

    def resolve(self, m: Manifest, stats: StatCache) -> Resolved:
        params, sources = resolve_adapters(m, stats)
        return Resolved(params, sources, fingerprints(self.tools))

    def describe(self, p: AdaptersParams) -> list[str]:
        shown = [f"{i}={a.name} ({'random, seed ' + str(a.seed) if a.seed is not None else a.directory})"
                 for i, a in enumerate(p.adapters, 1)]
        return [f"adapters: 0=base, {', '.join(shown)}"]

    def run(self, p: AdaptersParams, ctx: StageContext) -> dict[str, Any]:
        from qbuild.tasks.kv_lora import adapter_summary, check_against_base, write_random_adapter

        model = ctx.model(p.model)
        rows = []
        for i, a in enumerate(p.adapters, 1):
            out = ctx.out / a.name
            if a.seed is not None:
                assert p.r is not None and a.alpha is not None
                ctx.progress(f"random adapter {a.name} (seed {a.seed})", None)
                write_random_adapter(model, out, r=p.r, alpha=a.alpha, targets=p.target_modules, seed=a.seed)
            else:
                assert a.directory is not None
                self._copy_checked(a, label(i - 1, a.name), ctx, out, check_against_base, model)
            rows.append({"id": i, **adapter_summary(a.name, out)})
        summary = {"base_id": 0, "adapters": rows}
        (ctx.out / ADAPTERS_FILE).write_text(json.dumps(summary, indent=1))
        return {"adapters": [r["name"] for r in rows], "artifacts": {"adapters": ADAPTERS_FILE}}

    @staticmethod
    def _copy_checked(a: AdapterItem, key: str, ctx: StageContext, out: Path, check: Any, model: Any) -> None:
        """Copy a directory adapter's keyed files into the entry once they are the keyed bytes and fit the base."""
        from qbuild.errors import LoadError

        src = Path(str(a.directory))
        out.mkdir(parents=True)
        for rel in sorted(k.partition("/")[2] for k in ctx.sources if k.startswith(a.name + "/")):
            shutil.copy2(src / rel, out / rel)
            if hashlib.sha256((out / rel).read_bytes()).hexdigest() != ctx.sources[f"{a.name}/{rel}"]:
                raise LoadError(f"{key}: {src / rel} changed while building",
                                hint="run the build again")
        check(model, key, out, src)

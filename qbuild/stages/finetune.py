"""finetune: LoRA training of the loaded causal LM on a dataset file, between load and export.

Keyed by the base weights (the load stage's key, upstream), the dataset's content (sha256 through the stat
cache, never its path) and the training settings. Its entry holds the adapter (``adapter/``), the merged
weights (``merged/``, a save_pretrained directory export and verify read like a load entry's model), the
loss curve (``loss.json``, ``loss.png`` where matplotlib is installed) and the run's measurements
(``train.json``: seconds per step, peak RSS). With ``finetune.method: none`` the stage is not in the graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.errors import PlanError
from qbuild.finetune.lora import TrainSettings
from qbuild.manifest.schema import Manifest
from qbuild.plan.keys import fingerprints
from qbuild.plan.params import unkeyed
from qbuild.stages.base import ModelRef, Resolved, Stage, StageContext, TokenizerRef
from qbuild.stages.load import resolve_model
from qbuild.store import StatCache

ADAPTER_DIR, MERGED_DIR = "adapter", "merged"


@dataclass(frozen=True)
class FinetuneParams:
    """The base model, the data and how it is trained (the dataset's location is not keyed: its content is)."""

    model: ModelRef  # the base model as the load stage gives it (no rewrites)
    tokenizer: TokenizerRef
    format: str
    text_field: str
    max_seq_len: int
    train: TrainSettings
    dataset: str = unkeyed("", why="the dataset's location; the sha256 of its content keys this stage")


def resolve_dataset(value: str | None, stats: StatCache) -> tuple[Path, dict[str, str]]:
    """The dataset's path and the sha256 of its file(s) by name (``dataset``, or ``dataset/REL`` for a
    save_to_disk directory), read through the stat cache."""
    from qbuild.finetune.data import dataset_files

    if not value:
        raise PlanError("finetune.dataset: required with finetune=lora",
                        hint="set finetune.dataset=PATH (a JSONL file with a text field, or alpaca records)")
    path = Path(value).expanduser()
    if not path.exists():
        raise PlanError(f"finetune.dataset: {path} does not exist (relative paths are taken from the current "
                        f"directory, {Path.cwd()})", hint="point finetune.dataset at a JSONL or JSON file")
    path = path.resolve()
    if path.is_file():
        return path, {"dataset": stats.digest(path)}
    files = {"dataset/" + f.relative_to(path).as_posix(): stats.digest(f) for f in dataset_files(path)}
    if not files:
        raise PlanError(f"finetune.dataset: {path} is an empty directory",
                        hint="point finetune.dataset at a JSONL file or a datasets.save_to_disk directory")
    return path, files


class FinetuneStage(Stage):
    name = "finetune"
    upstream = ("load",)
    code = ("stages/finetune.py", "stages/base.py", "finetune/*.py", "models/source.py", "models/tokenizer.py")
    tools = ("torch", "transformers", "tokenizers", "peft")

    def resolve(self, m: Manifest, stats: StatCache) -> Resolved:
        model, tok = resolve_model(m)
        f = m.finetune
        path, sources = resolve_dataset(f.dataset, stats)
        lora = f.lora
        train = TrainSettings(f.steps, f.epochs, f.batch_size, f.gradient_accumulation_steps, f.learning_rate,
                              f.weight_decay, f.gradient_checkpointing, f.seed, lora.r, lora.alpha, lora.dropout,
                              tuple(lora.target_modules))
        p = FinetuneParams(model, tok, f.format, f.text_field, f.max_seq_len, train, str(path))
        return Resolved(p, sources, fingerprints(self.tools))

    def describe(self, p: FinetuneParams) -> list[str]:
        t = p.train
        length = f"{t.steps} steps" if t.steps is not None else f"{t.epochs} epoch(s)"
        return [f"finetune: LoRA r={t.r} alpha={t.alpha} on {', '.join(t.target_modules)}; {length} of batch "
                f"{t.batch_size} x {t.gradient_accumulation_steps}, lr {t.learning_rate}, seq <= {p.max_seq_len}, "
                f"seed {t.seed}" + (", gradient checkpointing" if t.gradient_checkpointing else "")
                + f"; data {p.dataset} ({p.format})"]

    def run(self, p: FinetuneParams, ctx: StageContext) -> dict[str, Any]:
        import torch

        from qbuild.finetune import lora
        from qbuild.finetune.data import read_examples, tokenize
        from qbuild.models.source import _torch_dtype, load_model
        from qbuild.models.tokenizer import load_tokenizer

        self._check_unchanged(p, ctx)
        ctx.progress("reading the dataset", None)
        examples = read_examples(Path(p.dataset), p.format, p.text_field)
        tokenizer = load_tokenizer(ctx.tokenizer_dir(p.tokenizer, p.model))
        data = tokenize(examples, tokenizer, p.max_seq_len)
        pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        ctx.progress("loading the base model", None)
        base_dir = ctx.model_dir(p.model)
        model = load_model(base_dir, "causal_lm", "float32")  # trained in float32, saved in model.dtype
        peft_model = lora.apply_lora(model, p.train)
        trainable = sum(x.numel() for x in peft_model.parameters() if x.requires_grad)
        steps = lora.train(peft_model, data, p.train, pad, ctx.progress)
        ctx.progress("saving the adapter and the merged weights", None)
        lora.save(peft_model, base_dir, ctx.out / ADAPTER_DIR, ctx.out / MERGED_DIR, _torch_dtype(p.model.dtype))
        del peft_model, model
        curve = [{k: s[k] for k in ("step", "loss", "lr", "tokens")} for s in steps]
        (ctx.out / "loss.json").write_text(json.dumps({"steps": curve}, indent=1))
        plotted = lora.plot(curve, ctx.out / "loss.png", f"LoRA r={p.train.r}, {len(examples)} examples")
        seconds = [s["seconds"] for s in steps]
        measured = {"examples": len(examples), "trained_examples": len(data), "steps": len(steps),
                    "trainable_parameters": trainable, "first_loss": curve[0]["loss"], "last_loss": curve[-1]["loss"],
                    "seconds": round(sum(seconds), 3), "seconds_per_step": round(sum(seconds) / len(seconds), 4),
                    "peak_rss_bytes": lora.peak_rss(), "torch_threads": torch.get_num_threads(),
                    "gradient_checkpointing": p.train.gradient_checkpointing}
        (ctx.out / "train.json").write_text(json.dumps(measured, indent=1))
        artifacts = {"adapter": ADAPTER_DIR, "merged_model": MERGED_DIR, "loss_curve": "loss.json"}
        if plotted:
            artifacts["loss_plot"] = "loss.png"
        return {**measured, "artifacts": artifacts}

    @staticmethod
    def _check_unchanged(p: FinetuneParams, ctx: StageContext) -> None:
        """The dataset must be the bytes that were keyed (it may have changed since planning)."""
        from qbuild.finetune.data import DatasetError

        _path, now = resolve_dataset(p.dataset, ctx.stats)
        if now != ctx.sources:
            raise DatasetError(f"finetune.dataset: {p.dataset} changed while building", hint="run the build again")

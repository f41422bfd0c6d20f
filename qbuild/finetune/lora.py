"""LoRA finetuning of a causal LM with peft: adapters on the named Linear modules, AdamW, gradient
accumulation and (optionally) gradient checkpointing, seeded end to end; then the adapter and the merged
weights saved as ``save_pretrained`` directories.

The order follows QEfficient (``QEfficient/cloud/finetune.py``): gradient checkpointing is enabled on the
transformers model *before* peft wraps it (peft reads ``is_gradient_checkpointing``), with the RNG state
preserved so dropout draws the same masks when activations are recomputed; ``use_reentrant=False``, so
the frozen inputs need no ``requires_grad`` hook. Each micro-batch's loss is divided by the number of
micro-batches in its accumulation window; a step's logged loss is their mean.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.errors import StageError

#: files of a save_pretrained directory that the merged model's own save_pretrained replaces
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class TrainSettings:
    """How the adapter is trained: every field shapes the weights (all keyed)."""

    steps: int | None  # optimizer steps; None: ``epochs`` passes over the data
    epochs: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    weight_decay: float
    gradient_checkpointing: bool
    seed: int
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps this run takes on ``n_examples`` examples."""
        if self.steps is not None:
            return self.steps
        return math.ceil(self.epochs * math.ceil(n_examples / self.batch_size) / self.gradient_accumulation_steps)


def apply_lora(model: Any, s: TrainSettings) -> Any:
    """``model`` (a transformers causal LM) in training mode with LoRA adapters; the base stays frozen."""
    import torch

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise StageError("finetune.method: lora needs the peft package, which is not installed",
                         hint="pip install -e '.[finetune]' (or pip install 'peft>=0.21,<0.22')") from None
    model.config.use_cache = False
    if s.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise StageError(f"finetune.gradient_checkpointing: {type(model).__name__} does not support it",
                             hint="set finetune.gradient_checkpointing=false")
        with warnings.catch_warnings():  # renamed activation_checkpointing_enable in transformers 5; same call
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                                "preserve_rng_state": True})
    config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules),
                        bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(s.seed)  # LoRA A's initialisation
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise StageError(f"finetune.lora.target_modules: {list(s.target_modules)}: {exc}",
                         hint="name Linear modules of this model, e.g. q_proj, k_proj, v_proj, o_proj") from None
    peft_model.train()
    return peft_model


def micro_batches(data: list[tuple[list[int], list[int]]], s: TrainSettings, pad_id: int) -> Iterator[dict[str, Any]]:
    """Padded micro-batches (right padding, labels -100 on padding), reshuffled each epoch with the seed,
    without end (the caller takes what it needs)."""
    import torch

    epoch = 0
    while True:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(s.seed + epoch)).tolist()
        for i in range(0, len(order), s.batch_size):
            rows = [data[j] for j in order[i:i + s.batch_size]]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [batch, seq]
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (x, y) in enumerate(rows):
                ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels}
        epoch += 1


def train(peft_model: Any, data: list[tuple[list[int], list[int]]], s: TrainSettings, pad_id: int,
          progress: Callable[[str, float | None], None] = lambda _m, _f: None) -> list[dict[str, Any]]:
    """Train in place; per optimizer step: its number, mean loss, learning rate, tokens and seconds."""
    import torch

    total = s.total_steps(len(data))
    n_micro = total * s.gradient_accumulation_steps if s.steps is not None else \
        s.epochs * math.ceil(len(data) / s.batch_size)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    stream = micro_batches(data, s, pad_id)
    steps: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)  # dropout masks
        for step in range(1, total + 1):
            t0 = time.perf_counter()
            window = min(s.gradient_accumulation_steps, n_micro - (step - 1) * s.gradient_accumulation_steps)
            losses, tokens = [], 0
            for _ in range(window):
                batch = next(stream)
                loss = peft_model(**batch).loss
                (loss / window).backward()
                losses.append(float(loss.detach()))
                tokens += int((batch["labels"][:, 1:] != -100).sum())
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_mean = sum(losses) / len(losses)
            if not math.isfinite(loss_mean):
                raise StageError(f"finetune: the loss became {loss_mean} at step {step}",
                                 hint="lower finetune.learning_rate")
            steps.append({"step": step, "loss": loss_mean, "lr": s.learning_rate, "tokens": tokens,
                          "seconds": time.perf_counter() - t0})
            elapsed = time.perf_counter() - t_start
            eta = elapsed / step * (total - step)
            bar = "#" * round(20 * step / total)
            progress(f"[{bar:<20}] step {step}/{total} loss {loss_mean:.4f} ETA {eta:.0f}s", step / total)
    return steps


def save(peft_model: Any, base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: Any) -> None:
    """The adapter (peft ``save_pretrained``) and the merged weights (``merge_and_unload``), saved in
    ``dtype`` beside the base directory's other files (tokenizer), as a load entry's model directory."""
    from qbuild.models.source import _quiet_transformers

    peft_model.eval()
    with _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model.save_pretrained(adapter_dir, save_embedding_layers=False)  # the LoRA weights only
        merged = peft_model.merge_and_unload()
        merged.gradient_checkpointing_disable()
        merged.config.use_cache = True
        merged.to(dtype)
        merged.save_pretrained(merged_dir)
    for f in sorted(base_dir.iterdir()):
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name not in MODEL_FILES \
                and not (merged_dir / f.name).exists():
            shutil.copyfile(f, merged_dir / f.name)


def plot(steps: list[dict[str, Any]], path: Path, title: str) -> bool:
    """The loss curve as a PNG; False (and no file) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], marker="o", markersize=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def peak_rss() -> int | None:
    """This process's peak resident memory in bytes: the executor's measure (VmHWM since the stage began)."""
    from qbuild.execute.executor import _peak_rss

    return _peak_rss()

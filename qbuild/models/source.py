"""Create and load Hugging Face models (torch and transformers are imported inside functions)."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import LoadError, one_line

if TYPE_CHECKING:
    import torch

#: task -> transformers auto class
_AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "embedding": "AutoModel"}
_DTYPES = ("float32", "float16", "bfloat16")
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")


def _auto_class(task: str) -> Any:
    if task not in _AUTO_CLASSES:
        raise LoadError(f"model.task: unknown task {task!r}; expected one of {sorted(_AUTO_CLASSES)}")
    import transformers

    return getattr(transformers, _AUTO_CLASSES[task])


def _torch_dtype(dtype: str) -> Any:
    if dtype not in _DTYPES:
        raise LoadError(f"model.dtype: unknown dtype {dtype!r}; expected one of {list(_DTYPES)}")
    import torch

    return getattr(torch, dtype)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars and load reports (the build reports its own progress)."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _register_own_models() -> None:
    """Architectures transformers lacks, implemented in qbuild (model_types grok-1, llama_swiftkv)."""
    from qbuild.models import grok1, llama_swiftkv

    grok1.register()
    llama_swiftkv.register()


def settle_imports() -> None:
    """Once per process, after the heavy imports and before a model exists: collect, then move every live
    object to the garbage collector's permanent generation. transformers' modules hold reference cycles, so
    a model is freed by ``gc.collect()``; with the import-time objects frozen, each later collection (and
    Python's automatic ones) scans only what the build made. Collecting first: garbage is never frozen."""
    import gc

    if not _SETTLED:
        gc.collect()
        gc.freeze()
        _SETTLED.append(True)


_SETTLED: list[bool] = []


def _make_config(architecture: str, overrides: dict[str, Any]) -> Any:
    _register_own_models()  # before the CONFIG_MAPPING check below
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    known = list(CONFIG_MAPPING.keys())
    if architecture not in known:
        close = difflib.get_close_matches(architecture, known, n=5, cutoff=0.6)
        hint = f"did you mean: {', '.join(close)}?" if close else "use a transformers model_type, e.g. llama"
        raise LoadError(f"model.architecture: unknown architecture {architecture!r}", hint=hint)
    try:
        return AutoConfig.for_model(architecture, **overrides)
    except Exception as exc:  # config validators raise assorted types
        raise LoadError(f"model.config: cannot build a {architecture} config: {one_line(exc)}") from exc


def init_random(
    architecture: str,
    overrides: dict[str, Any],
    seed: int,
    dtype: str,
    out_dir: Path,
    *,
    task: str = "causal_lm",
) -> dict[str, Any]:
    """Initialise ``architecture`` with random weights (seeded) and save it to ``out_dir``."""
    import torch

    config = _make_config(architecture, dict(overrides))
    auto, torch_dtype = _auto_class(task), _torch_dtype(dtype)
    settle_imports()
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        try:
            model = auto.from_config(config)
        except Exception as exc:
            raise LoadError(f"model.architecture: {architecture!r} has no {task} model: {one_line(exc)}") from exc
    model = model.to(torch_dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # transformers 5 always writes safetensors (safe_serialization is gone from save_pretrained)
    with _quiet_transformers():
        model.save_pretrained(out_dir)
    return {
        "model_type": config.model_type,
        "architectures": list(getattr(model.config, "architectures", None) or []),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": dtype,
        "files": sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()),
    }


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise LoadError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise LoadError(
            f"model directory {model_dir} has no config.json",
            hint="expected a directory written by save_pretrained",
        )
    if not any(any(model_dir.glob(p)) for p in _WEIGHT_PATTERNS):
        raise LoadError(
            f"model directory {model_dir} has no weights (*.safetensors or pytorch_model*.bin)",
            hint="expected a directory written by save_pretrained",
        )


def load_model(model_dir: Path, task: str, dtype: str) -> torch.nn.Module:
    """Load a model from a local directory only: eager attention, eval mode, no gradients.

    Weights the model needs but the checkpoint lacks are an error (transformers would initialise
    them randomly); extra checkpoint weights (e.g. a causal LM's head under task embedding) are not.
    """
    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    _register_own_models()
    from qbuild.models.grok1 import checkpoint_config

    auto, torch_dtype = _auto_class(task), _torch_dtype(dtype)
    settle_imports()
    try:
        with _quiet_transformers():
            model, info = auto.from_pretrained(
                model_dir,
                config=checkpoint_config(model_dir),  # None unless config.json is Grok-1's
                local_files_only=True,
                attn_implementation="eager",
                dtype=torch_dtype,
                output_loading_info=True,
            )
    except Exception as exc:
        raise LoadError(f"cannot load {task} model from {model_dir}: {one_line(exc)}") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise LoadError(
            f"model directory {model_dir} lacks weights the {task} model needs: {shown}",
            hint="check model.task matches the checkpoint (e.g. a base model saved without its LM head)",
        )
    model.eval()
    model.requires_grad_(False)
    return model

"""Making, loading and rewriting VLMs (torch and transformers are imported inside functions).

A tiny twin (``init: random``) is saved with a processor built in-process: a byte-level BPE trained on the
built-in corpus plus the family's image special tokens at the ids its config names, the family's image
processor at the config's image size, and a small chat template; ``save_pretrained`` puts both beside the
weights, so everything after the load stage reads them offline like a checkpoint's.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from qbuild.errors import LoadError, one_line
from qbuild.models.source import _quiet_transformers

#: a chat template for tiny twins: the user turn (images, then text) and the model's turn
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "{{ image_placeholder }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>model\n{% endif %}")


def family(model_type: str) -> Any:
    """The family module (qbuild.vlm.gemma3 / llama4) of a composite config's model type."""
    from qbuild.vlm import FAMILIES

    if model_type not in FAMILIES:
        raise LoadError(f"no VLM family for model type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[model_type])


def init_random(config: dict[str, Any], seed: int, dtype: str, out: Path) -> dict[str, Any]:
    """Random weights for ``config`` (``model_type`` + overrides), and the family's processor, saved in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    overrides = dict(config)
    model_type = overrides.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **overrides)
    except Exception as exc:
        raise LoadError(f"model.config: cannot build a {model_type} config: {one_line(exc)}") from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg)
        family(model_type).randomize(model)
    for t in [*model.parameters(), *model.buffers()]:  # not Module.to: it would make a complex buffer real
        if t.is_floating_point():
            t.data = t.data.to(getattr(torch, dtype))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(out)
    processor = family(model_type).tiny_processor(cfg, out)
    processor.save_pretrained(out)
    return {"model_type": model_type, "architectures": list(model.config.architectures or []),
            "num_parameters": int(sum(p.numel() for p in model.parameters())), "dtype": dtype,
            "processor": type(processor).__name__,
            "files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())}


def special_tokenizer(vocab_size: int, specials: dict[str, tuple[str, int]], out: Path) -> Any:
    """A BPE of ``vocab_size - len(specials)`` tokens, then ``specials`` (attribute -> (token, id)) added in id
    order at the top of the vocabulary; the ids must be the config's."""
    from transformers import PreTrainedTokenizerFast

    from qbuild.models.tokenizer import train_bpe

    ordered = sorted(specials.items(), key=lambda kv: kv[1][1])
    first = vocab_size - len(ordered)
    if [i for _, (_, i) in ordered] != list(range(first, vocab_size)):
        raise LoadError(f"model.config: the image special tokens must take the last ids of the vocabulary "
                        f"({first}..{vocab_size - 1}) in a tiny twin; got {dict(specials)}")
    tmp = out / "_bpe"
    train_bpe(first, tmp)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp, extra_special_tokens={k: t for k, (t, _) in ordered})
    import shutil

    shutil.rmtree(tmp)
    return tok


def load(model_dir: Path, dtype: str) -> Any:
    """The VLM in ``model_dir`` (offline, eager attention, eval, no gradients)."""
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        with _quiet_transformers():
            model = AutoModelForImageTextToText.from_pretrained(
                model_dir, local_files_only=True, dtype=getattr(torch, dtype), attn_implementation="eager")
    except Exception as exc:
        raise LoadError(f"cannot load an image-text-to-text model from {model_dir}: {one_line(exc)}") from exc
    model.eval()
    model.requires_grad_(False)
    fix = getattr(family(model.config.model_type), "fix_transformers", None)
    if fix is not None:
        fix(model)
    return model


def decoder(vlm: Any) -> Any:
    """The language program's module: the family's text LM, KV-rewritten, behind the VLM decoder signature."""
    from qbuild.transforms.kv_cache import apply
    from qbuild.vlm.decoder import VLMDecoder

    fam = family(vlm.config.model_type)
    lm = fam.text_lm(vlm)
    apply(lm)
    return VLMDecoder(lm, fam.image_token_id(vlm), bidirectional_images=fam.BIDIRECTIONAL_IMAGES)


def vision_encoder(vlm: Any) -> Any:
    return family(vlm.config.model_type).VisionEncoder(vlm).eval()


def load_processor(directory: Path) -> Any:
    """The model's own processor, offline (Llama 4's with qbuild's tiler: its image processor needs torchvision)."""
    import json

    from transformers import AutoProcessor

    def kinds(name: str) -> set[str]:
        path = Path(directory) / name
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        return {str(data.get("processor_class")), str(data.get("image_processor_type"))}

    try:
        llama4 = {"Llama4Processor", "Llama4ImageProcessor", "Llama4ImageProcessorFast"}
        if (kinds("processor_config.json") | kinds("preprocessor_config.json")) & llama4:
            return family("llama4").load_processor(Path(directory))
        return AutoProcessor.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise LoadError(f"cannot load the processor from {directory}: {one_line(exc)}") from exc

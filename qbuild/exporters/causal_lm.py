"""Export a Hugging Face causal LM to ONNX: ``(input_ids, attention_mask) -> logits``."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import ExportError

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
EXPORTERS = ("legacy", "dynamo")
#: the dynamo exporter emits opset 18 or later
DYNAMO_MIN_OPSET = 18
#: example batch >= 2: torch.export specialises a size-1 dimension to a constant
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 8


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception (with the next line when the first ends in a colon)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else "".join(lines[:1])
    return f"{type(exc).__name__}: {text}"[:300]


def _logits_module(model: Any) -> Any:
    """Wrap ``model`` so that it takes two positional tensors and returns float32 logits."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits.float()

    return LogitsOnly(model).eval()


def example_inputs(vocab_size: int) -> tuple[Any, Any]:
    """Batch 2, length 8; the second row is right-padded so the mask path is traced."""
    import torch

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (_EXAMPLE_BATCH, _EXAMPLE_SEQ), generator=gen)
    attention_mask = torch.ones(_EXAMPLE_BATCH, _EXAMPLE_SEQ, dtype=torch.int64)
    attention_mask[1, -3:] = 0
    return input_ids, attention_mask


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' deprecation/tracer warnings and info logging."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _export_legacy(wrapper: Any, args: tuple[Any, ...], path: Path, opset: int) -> None:
    import torch

    axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    torch.onnx.export(
        wrapper,
        args,
        str(path),
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        dynamic_axes=axes,
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )


def _export_dynamo(wrapper: Any, args: tuple[Any, ...], path: Path, opset: int) -> None:
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    shapes = {name: {0: batch, 1: seq} for name in INPUT_NAMES}
    program = torch.onnx.export(
        wrapper,
        args,
        None,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=shapes,
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    program.save(str(path), external_data=True)  # tensors go to model.onnx.data


def _check_args(exporter: str, opset: int) -> None:
    if exporter not in EXPORTERS:
        raise ExportError(f"export.exporter: unknown exporter {exporter!r}; expected one of {list(EXPORTERS)}")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(
            f"export.opset: the dynamo exporter needs opset >= {DYNAMO_MIN_OPSET}, got {opset}",
            hint=f"set export.opset={DYNAMO_MIN_OPSET} or export.exporter=legacy",
        )
    if exporter == "dynamo":
        import importlib.util

        if importlib.util.find_spec("onnxscript") is None:
            raise ExportError(
                "export.exporter: the dynamo exporter needs the onnxscript package, which is not installed",
                hint="pip install onnxscript, or set export.exporter=legacy",
            )


def _files(out_dir: Path) -> set[str]:
    return {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}


def _gather_external_data(path: Path, extra: set[str]) -> None:
    """Fold the legacy exporter's one-file-per-tensor external data (models > 2 GiB) into one file."""
    import onnx

    if not extra:
        return
    model = onnx.load(str(path))  # reads the external tensors into memory
    for name in extra:
        (path.parent / name).unlink()
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )


def export_causal_lm(model: torch.nn.Module, out_dir: Path, *, exporter: str, opset: int) -> dict[str, Any]:
    """Export ``model`` to ``out_dir/model.onnx`` (+ ``model.onnx.data``) with dynamic batch and seq axes.

    The result is checked with ``onnx.checker``. Returns the file names written and the I/O names.
    """
    import onnx

    _check_args(exporter, opset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    wrapper = _logits_module(model)
    args = example_inputs(int(model.config.vocab_size))
    before = _files(out_dir)
    try:
        with _quiet():
            if exporter == "dynamo":
                _export_dynamo(wrapper, args, path, opset)
            else:
                _export_legacy(wrapper, args, path, opset)
                _gather_external_data(path, _files(out_dir) - before - {MODEL_FILE})
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"{exporter} export to {path} failed: {_one_line(exc)}") from exc
    return {
        "onnx": MODEL_FILE,
        "files": sorted(_files(out_dir) - (before - {MODEL_FILE, DATA_FILE})),
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "exporter": exporter,
        "opset": opset,
    }

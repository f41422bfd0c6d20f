"""Export a Hugging Face causal LM to ONNX: ``(input_ids, attention_mask) -> logits``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import ExportError
from qbuild.exporters.common import (
    DATA_FILE,
    MODEL_FILE,
    check_args,
    example_inputs,
    gather_external_data,
    one_line,
    output_files,
    quiet,
)

if TYPE_CHECKING:
    import torch

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)


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


def export_causal_lm(model: torch.nn.Module, out_dir: Path, *, exporter: str, opset: int) -> dict[str, Any]:
    """Export ``model`` to ``out_dir/model.onnx`` (+ ``model.onnx.data``) with dynamic batch and seq axes.

    The result is checked with ``onnx.checker``. Returns the file names written and the I/O names.
    """
    import onnx

    check_args(exporter, opset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    wrapper = _logits_module(model)
    args = example_inputs(int(model.config.vocab_size))
    before = output_files(out_dir)
    try:
        with quiet():
            if exporter == "dynamo":
                _export_dynamo(wrapper, args, path, opset)
            else:
                _export_legacy(wrapper, args, path, opset)
                gather_external_data(path, output_files(out_dir) - before - {MODEL_FILE})
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"{exporter} export to {path} failed: {one_line(exc)}") from exc
    return {
        "onnx": MODEL_FILE,
        "files": sorted(output_files(out_dir) - (before - {MODEL_FILE, DATA_FILE})),
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "exporter": exporter,
        "opset": opset,
    }

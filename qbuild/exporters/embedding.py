"""Export an encoder with its pooling to ONNX: ``(input_ids, attention_mask) -> [batch_size, hidden]``.

Dynamic dims are named ``batch_size`` and ``seq_len``: the specialisations' symbol names. The pooled
output is ``sentence_embedding``; with ``pooling: none`` it is ``token_embeddings`` ``[batch_size,
seq_len, hidden]`` (an output named ``embedding`` would collide with an internal value under dynamo).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import ExportError, ManifestError
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
from qbuild.pooling import Pooling, pooled_module

if TYPE_CHECKING:
    import torch

INPUT_NAMES = ("input_ids", "attention_mask")
DIMS = ("batch_size", "seq_len")


def output_name(pooling: Pooling) -> str:
    return "token_embeddings" if pooling.method == "none" else "sentence_embedding"


def _trial(wrapper: Any, args: tuple[Any, ...], pooling: Pooling) -> tuple[int, ...]:
    """Run the pooled module once in PyTorch and check the output's shape (user functions included)."""
    import torch

    try:
        with torch.no_grad():
            out = wrapper(*args)
    except Exception as exc:
        raise ManifestError(f"pooling.method: {pooling.method} failed on a [2, 8] example: {one_line(exc)}",
                            key="pooling.method") from exc
    rank = 3 if pooling.method == "none" else 2
    ok = isinstance(out, torch.Tensor) and out.dim() == rank and out.shape[0] == args[0].shape[0]
    if not ok:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        want = "[batch, seq, hidden]" if rank == 3 else "[batch, hidden]"
        raise ManifestError(f"pooling.method: {pooling.method} returned {got} for a [2, 8] input; expected "
                            f"a tensor {want}", key="pooling.method")
    return tuple(out.shape)


def _export(wrapper: Any, args: tuple[Any, ...], path: Path, output: str, exporter: str, opset: int) -> None:
    import torch

    if exporter == "dynamo":
        batch, seq = (torch.export.Dim(d) for d in DIMS)
        program = torch.onnx.export(wrapper, args, None, input_names=list(INPUT_NAMES), output_names=[output],
                                    dynamic_shapes={n: {0: batch, 1: seq} for n in INPUT_NAMES},
                                    opset_version=opset, dynamo=True, verbose=False)
        program.save(str(path), external_data=True)
        return
    axes: dict[str, dict[int, str]] = {n: {0: DIMS[0], 1: DIMS[1]} for n in INPUT_NAMES}
    axes[output] = {0: DIMS[0], 1: DIMS[1]} if output == "token_embeddings" else {0: DIMS[0]}
    torch.onnx.export(wrapper, args, str(path), input_names=list(INPUT_NAMES), output_names=[output],
                      dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)


def export_embedding(model: torch.nn.Module, out_dir: Path, pooling: Pooling, *, exporter: str,
                     opset: int) -> dict[str, Any]:
    """Export ``model`` + ``pooling`` to ``out_dir/model.onnx`` (+ ``.data``), checked with onnx.checker."""
    import onnx

    check_args(exporter, opset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, output = out_dir / MODEL_FILE, output_name(pooling)
    wrapper = pooled_module(model, pooling)
    args = example_inputs(int(model.config.vocab_size))
    example_shape = _trial(wrapper, args, pooling)
    before = output_files(out_dir)
    try:
        with quiet():
            _export(wrapper, args, path, output, exporter, opset)
            if exporter == "legacy":
                gather_external_data(path, output_files(out_dir) - before - {MODEL_FILE})
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"{exporter} export of the {pooling.method}-pooled encoder to {path} failed: "
                          f"{one_line(exc)}") from exc
    return {
        "onnx": MODEL_FILE,
        "files": sorted(output_files(out_dir) - (before - {MODEL_FILE, DATA_FILE})),
        "inputs": list(INPUT_NAMES),
        "outputs": [output],
        "dims": list(DIMS),
        "hidden_size": int(example_shape[-1]),
        "vocab_size": int(model.config.vocab_size),
        "pooling": pooling.as_dict(),
        "exporter": exporter,
        "opset": opset,
    }

"""What the ONNX exporters share: file names, argument checks, example inputs, external data, quiet export."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qbuild.errors import ExportError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXPORTERS = ("legacy", "dynamo")
#: the dynamo exporter emits opset 18 or later
DYNAMO_MIN_OPSET = 18
#: example batch >= 2: torch.export specialises a size-1 dimension to a constant
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8


def example_inputs(vocab_size: int) -> tuple[Any, Any]:
    """Batch 2, length 8; the second row is right-padded so the mask path is traced."""
    import torch

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=gen)
    attention_mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.int64)
    attention_mask[1, -3:] = 0
    return input_ids, attention_mask


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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


def check_args(exporter: str, opset: int) -> None:
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


def output_files(out_dir: Path) -> set[str]:
    return {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}


def gather_external_data(path: Path, extra: set[str]) -> None:
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

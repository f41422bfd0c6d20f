"""Causal LM without a KV cache: ``logits`` from ``input_ids`` + ``attention_mask`` (dynamic batch, seq).

Export wraps the model to return float32 logits; compile gets one ``Seq_<n>`` specialisation per bucket;
verify compares the artifact's logits with PyTorch's on fixed right-padded inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import ExportError, VerifyError, one_line
from qbuild.manifest.schema import Manifest
from qbuild.tasks import Task
from qbuild.tasks.export_common import (
    DATA_FILE,
    MODEL_FILE,
    check_args,
    example_inputs,
    gather_external_data,
    legacy_export,
    output_files,
    quiet,
)

if TYPE_CHECKING:
    import torch

    from qbuild.runtime import Artifact
    from qbuild.stages.base import StageContext
    from qbuild.stages.export import ExportParams
    from qbuild.stages.verify import VerifyParams


@dataclass(frozen=True)
class CausalLMVerify:
    atol: float
    seed: int
    batch_size: int
    seq_len: int


class CausalLMTask(Task):
    name = "causal_lm"
    code = ("tasks/__init__.py", "tasks/causal_lm.py", "tasks/export_common.py")

    def export(self, model: Any, out: Path, p: ExportParams, ctx: StageContext) -> dict[str, Any]:
        return export_causal_lm(model, out, exporter=p.exporter, opset=p.opset)

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        b = m.seq.batch_size
        return [{"name": f"Seq_{n}", "symbols": {"batch": b, "seq": n}} for n in m.seq.lengths]

    def verify_options(self, m: Manifest) -> CausalLMVerify:
        v = m.verify
        return CausalLMVerify(self.atol(m), v.seed, v.batch_size, v.seq_len)

    def verify(self, p: VerifyParams, ctx: StageContext, artifact: Artifact) -> dict[str, Any]:
        o: CausalLMVerify = p.check
        model = ctx.model(p.model)
        ctx.progress(f"comparing {artifact.backend} logits with PyTorch", None)
        session = artifact.sessions().session_for({"batch": o.batch_size, "seq": o.seq_len})
        return verify_causal_lm(model, session, batch_size=o.batch_size, seq_len=o.seq_len, seed=o.seed,
                                atol=o.atol, vocab_size=model.config.vocab_size)


# --- export -----------------------------------------------------------------------------------------

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
    axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    legacy_export(wrapper, args, path, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                  dynamic_axes=axes, opset_version=opset, do_constant_folding=True)


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


# --- verify -----------------------------------------------------------------------------------------

def verify_inputs(batch_size: int, seq_len: int, seed: int, vocab_size: int) -> tuple[Any, Any]:
    """Token ids from ``RandomState(seed)``; row i >= 1 has its last ``2*i`` positions right-padded.

    Every row keeps at least one real token. Both arrays are int64, shape ``(batch_size, seq_len)``.
    """
    import numpy as np

    rng = np.random.RandomState(seed)
    input_ids = rng.randint(0, vocab_size, size=(batch_size, seq_len)).astype(np.int64)
    attention_mask = np.ones((batch_size, seq_len), dtype=np.int64)
    for i in range(1, batch_size):
        pad = min(2 * i, seq_len - 1)
        if pad:
            attention_mask[i, seq_len - pad :] = 0
    return input_ids, attention_mask


def torch_logits(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """The reference: float32 logits of ``model`` as a numpy array (no cache, no gradients)."""
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            use_cache=False,
        )
    return out.logits.float().numpy()


def _max_diff(ref: Any, got: Any, mask: Any) -> tuple[float, tuple[int, int]]:
    """Largest |ref - got| over non-padded positions (NaN counts as infinite) and where it is."""
    import numpy as np

    per_pos = np.abs(ref.astype(np.float64) - got.astype(np.float64)).max(axis=-1)
    per_pos = np.where(np.isnan(per_pos), np.inf, per_pos)
    per_pos = np.where(mask.astype(bool), per_pos, -1.0)
    row, pos = np.unravel_index(int(np.argmax(per_pos)), per_pos.shape)
    return float(per_pos[row, pos]), (int(row), int(pos))


def verify_causal_lm(
    model: torch.nn.Module,
    session: Any,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    atol: float,
    vocab_size: int,
) -> dict[str, Any]:
    """Raise VerifyError if ONNX Runtime's logits differ from PyTorch's by more than ``atol``."""
    import numpy as np

    input_ids, attention_mask = verify_inputs(batch_size, seq_len, seed, vocab_size)
    ref = torch_logits(model, input_ids, attention_mask)
    try:
        got = session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]
    except Exception as exc:
        raise VerifyError(f"ONNX Runtime failed on the verify inputs: {one_line(exc)}") from exc
    if got.shape != ref.shape:
        raise VerifyError(f"logits shape differs: ONNX Runtime {got.shape} vs PyTorch {ref.shape}")
    valid = attention_mask.astype(bool)
    max_diff, (row, pos) = _max_diff(ref, got, attention_mask)
    agree = (ref.argmax(axis=-1) == got.argmax(axis=-1))[valid]
    report = {
        "max_abs_diff": max_diff,
        "atol": atol,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "positions_compared": int(valid.sum()),
        "argmax_agreement": float(np.mean(agree)),
    }
    if not max_diff <= atol:
        raise VerifyError(
            f"logits differ from PyTorch: max abs diff {max_diff:.3g} > atol {atol:g} "
            f"at batch row {row}, position {pos} ({report['argmax_agreement']:.1%} argmax agreement)",
            hint="if the difference is expected (e.g. float16), raise verify.atol",
        )
    return report

"""Compare a causal LM's PyTorch logits with an ONNX Runtime session's, on fixed padded inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qbuild.errors import VerifyError

if TYPE_CHECKING:
    import onnxruntime
    import torch


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


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception (with the next line when the first ends in a colon)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else "".join(lines[:1])
    return f"{type(exc).__name__}: {text}"[:300]


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
    session: onnxruntime.InferenceSession,
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
        raise VerifyError(f"ONNX Runtime failed on the verify inputs: {_one_line(exc)}") from exc
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

"""ONNX Runtime weight quantisation as compile flags: int8 dynamic and int4 MatMulNBits build and run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qbuild.api import build, plan
from qbuild.runtime.generate import KVRuntime
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
KV = ROOT / "manifests" / "tiny-llama-kv.yaml"
BASE = ["seq.lengths=[8]", "seq.ctx_len=64", "model.config.hidden_size=128", "model.config.intermediate_size=256"]


def _prefill_logits(compiled: Path) -> np.ndarray:
    rt = KVRuntime(compiled, ctx_len=64, buckets=[8])
    rt._alloc(2)
    logits, _ = rt.prefill([[5, 6, 7, 8, 9], [10, 11, 12]])
    return logits


# ONNX Runtime fuses int8 MatMulInteger into DynamicQuantizeMatMul / MatMulIntegerToFloat when optimising
@pytest.mark.parametrize(("mode", "ops"), [("int8", {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}),
                                          ("int4", {"MatMulNBits"})])
def test_quantised_build_runs_and_is_smaller(tmp_path: Path, mode: str, ops: set[str]) -> None:
    import onnx

    ref = build(KV, BASE, cache_dir=tmp_path)
    p = plan(KV, [*BASE, f"compile.onnxruntime.quantize={mode}"], cache_dir=tmp_path)
    assert [s.state for s in p.stages] == ["cached", "cached", "build"]  # export reused
    assert any(f"compile.onnxruntime.quantize={mode}" in n for n in p.notes)  # verify skipped, and said why
    q = build(KV, [*BASE, f"compile.onnxruntime.quantize={mode}"], cache_dir=tmp_path)
    qdir, rdir = Path(q.artifacts["compiled"]), Path(ref.artifacts["compiled"])
    graph_ops = {n.op_type for n in onnx.load(str(qdir / "model.onnx"), load_external_data=False).graph.node}
    assert graph_ops & ops

    def size(d: Path) -> int:
        return sum(f.stat().st_size for f in d.iterdir())

    assert size(qdir) < 0.7 * size(rdir)
    a, b = _prefill_logits(rdir), _prefill_logits(qdir)
    assert np.isfinite(b).all()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9  # loose: random weights quantise poorly

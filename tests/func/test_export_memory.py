"""The export stage's peak memory stays a small multiple of the weights (issue 16): not a timing assert.

A cold build of a ~20M-parameter Llama (89 MB of fp32 weights); its export record holds ``start_rss_bytes``,
``peak_rss_bytes`` (VmHWM, reset when the stage starts) and ``weight_bytes``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import ROOT, run_qbuild

CONFIG = {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
          "intermediate_size": 1024, "vocab_size": 32000}
#: Measured (bench/export.py, 3 fresh-process runs each): export (peak - start) RSS / weights is 4.9x for this
#: model (5.1x before issue 16) and 4.1x for the 125M one; the peak is torch.onnx.export itself (the bare
#: exporter alone peaks as high: the module's weights, the C++ ModelProto, its serialised bytes and their Python
#: copy). The smaller model's ratio carries the exporter's fixed overhead. 6.5x leaves ~30% for allocator noise
#: and torch versions, and still fails when the stage holds one or two more full copies of the weights at the peak.
MAX_RATIO = 6.5


def test_export_peak_rss_is_bounded_by_the_weights(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    overrides = [f"model.config.{k}={v}" for k, v in CONFIG.items()]
    run_qbuild(str(ROOT / "manifests" / "tiny-llama-kv.yaml"), *overrides, "seq.lengths=[32]", "seq.ctx_len=128",
               "verify.enabled=false", "compile.backend=onnxruntime", cache=cache, check=True)
    (record,) = (cache / "objects" / "export").glob("*/record.json")
    rec = json.loads(record.read_text())
    weights = rec["weight_bytes"]
    assert weights > 80e6  # fp32, ~20M parameters: large enough that the exporter's fixed overhead is small
    ratio = (rec["peak_rss_bytes"] - rec["start_rss_bytes"]) / weights
    assert 0 < ratio <= MAX_RATIO, f"export peak RSS grew {ratio:.2f}x the weights (bound {MAX_RATIO}x)"

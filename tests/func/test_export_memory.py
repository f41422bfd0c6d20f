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
#: (peak - start) RSS / weights of this model's export stage: 0.75-0.77x in three cold builds (issue 16: the weights'
#: pages are handed back once traced and written, the head is exported in blocks; 1.62x before, 4.9x before the
#: lean exporter). Without MADV_PAGEOUT (Linux < 5.4) every traced weight stays resident: ~1.6x. Each bound
#: leaves ~0.5x for allocator noise and torch versions, and still fails when the stage holds one more full copy.
MAX_RATIO, MAX_RATIO_NO_PAGEOUT = 1.3, 2.1


def _pageout_works(tmp: Path) -> bool:
    """Does ``release_pages`` drop a read, file-backed tensor's pages from this process's RSS here?"""
    import numpy as np
    import torch

    from qbuild.tasks.export_common import release_pages

    def rss_file() -> int:
        status = Path("/proc/self/status")
        line = next((ln for ln in status.read_text().splitlines() if ln.startswith("RssFile:")), None) \
            if status.exists() else None
        return int(line.split()[1]) * 1024 if line else 0

    n = 4 << 20
    (tmp / "probe.bin").write_bytes(np.zeros(n, np.float32).tobytes())
    t = torch.from_file(str(tmp / "probe.bin"), shared=False, size=n, dtype=torch.float32)
    float(t.sum())
    touched = rss_file()
    release_pages([t])
    return touched - rss_file() > (8 << 20)


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
    bound = MAX_RATIO if _pageout_works(tmp_path) else MAX_RATIO_NO_PAGEOUT
    assert 0 < ratio <= bound, f"export peak RSS grew {ratio:.2f}x the weights (bound {bound}x)"

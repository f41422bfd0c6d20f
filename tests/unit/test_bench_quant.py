"""bench/quant_trained.py (slow): its --quick run trains a small Llama on Python's documentation, builds it in fp32
and each quantisation, checks fp32's tokens against Hugging Face generate, and ends with a rule-15 JSON line."""

from __future__ import annotations

import math

import pytest

from tests.conftest import quick_bench


@pytest.mark.slow
def test_quick_quant_trained_compares_each_quantisation_with_fp32() -> None:
    last = quick_bench("quant_trained")
    t = last["training"]
    assert t["last_loss"] < t["first_loss"] and math.isfinite(t["held_out_loss"])  # it did train
    assert last["fp32"]["tokens_match_hf"] is True
    q = last["quantized"]
    assert set(q) == {"int8", "int8_block", "int4", "int4:0.999"}
    for r in q.values():
        assert 0 <= r["greedy_overall"]["min"] <= r["greedy_overall"]["median"] <= 1
        assert 0 <= r["teacher_forced_top1"]["min"] <= r["teacher_forced_top1_mean"] <= 1
        assert math.isfinite(r["nll_increase"])
    # block int8 stays close to fp32 on the held-out text; int4 carries zero points, int8_block does not
    assert q["int8_block"]["teacher_forced_top1_mean"] >= 0.9 and abs(q["int8_block"]["nll_increase"]) < 0.05
    assert (q["int4"]["symmetric"], q["int8_block"]["symmetric"], q["int8"]["symmetric"]) == (False, True, None)
    assert q["int4:0.999"]["matmuls"] == 2 * 7 + 1 and q["int4"]["kept_fp32"] == []
    assert q["int4"]["head"] == {"matmuls": ["/inner/lm_head/MatMul"], "quantize": "int8_block"}
    assert q["int8_block"]["head"] is None

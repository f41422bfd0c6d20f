"""bench/gqa_ceiling.py (slow): its --quick run checks qbuild's fused graph and the hand-built GroupQueryAttention
graph against qbuild's plain graph on the same weights before timing, and ends with a rule-15 JSON line."""

from __future__ import annotations

import pytest

from tests.conftest import quick_bench


@pytest.mark.slow
def test_quick_gqa_ceiling_computes_qbuilds_model_and_ends_with_json_line() -> None:
    last = quick_bench("gqa_ceiling")
    # teacher-forced logits of the three graphs, one token a step
    assert last["logit_diff_of_spread"] < 1e-4 and last["fused_logit_diff_of_spread"] < 1e-4
    assert last["gqa_nodes"] == 1 + 2 * 15 + 2  # embedding, 15 a layer (2 layers), final norm and head
    assert last["nodes"]["hand"] < last["nodes"]["fused"] < last["nodes"]["plain"] / 2
    assert last["plain_tok_s"] > 0 and last["fused_tok_s"] > 0 and last["gqa_tok_s"] > 0
    assert last["fused_over_plain_min"] > 0

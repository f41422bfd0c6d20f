"""bench/gqa_ceiling.py (slow): its --quick run checks the hand-built GroupQueryAttention graph against qbuild's
runtime on the same weights before timing, and ends with a rule-15 JSON line."""

from __future__ import annotations

import pytest

from tests.conftest import quick_bench


@pytest.mark.slow
def test_quick_gqa_ceiling_computes_qbuilds_model_and_ends_with_json_line() -> None:
    last = quick_bench("gqa_ceiling")
    assert last["logit_diff_of_spread"] < 1e-4  # teacher-forced logits of both graphs, one token a step
    assert last["gqa_nodes"] == 1 + 2 * 15 + 2  # embedding, 15 a layer (2 layers), final norm and head
    assert last["qbuild_tok_s"] > 0 and last["gqa_tok_s"] > 0

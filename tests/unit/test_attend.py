"""Grouped-query attention in the KV rewrite: the folded form (query heads as rows of their KV head, the
ONNX Runtime graph) against QEfficient's repeat_kv form (the qaic graph) and a float64 reference."""

from __future__ import annotations

import pytest
import torch

from qbuild.transforms.kv_cache import attend, causal_mask


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Per query head h, attention over KV head h // groups, in float64."""
    b, hq, s, d = q.shape
    groups = hq // k.shape[1]
    out = torch.empty(b, hq, s, v.shape[-1], dtype=torch.float64)
    for h in range(hq):
        scores = q[:, h].double() @ k[:, h // groups].double().transpose(1, 2) * scaling  # [B,S,C]
        scores = scores.masked_fill(~mask[:, 0], torch.finfo(torch.float64).min)
        out[:, h] = torch.softmax(scores, -1) @ v[:, h // groups].double()
    return out.transpose(1, 2).reshape(b, s, hq * v.shape[-1])


@pytest.mark.parametrize(("hq", "hkv", "s"), [(8, 2, 1), (8, 2, 5), (6, 3, 4), (4, 4, 3), (4, 1, 2)])
def test_folded_and_repeated_grouped_query_attention_agree(hq: int, hkv: int, s: int) -> None:
    torch.manual_seed(hq * 100 + hkv * 10 + s)
    b, ctx, d = 2, 16, 8
    q, k, v = torch.randn(b, hq, s, d), torch.randn(b, hkv, ctx, d), torch.randn(b, hkv, ctx, d)
    position_ids = torch.tensor([list(range(7, 7 + s)), [-1] * (s - 1) + [3]])  # a padded second row
    mask = causal_mask(position_ids, ctx)
    folded = attend(q, k, v, mask, d**-0.5)
    repeated = attend(q, k, v, mask, d**-0.5, repeat=True)
    assert folded.shape == repeated.shape == (b, s, hq * d)
    torch.testing.assert_close(folded, repeated, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(folded.double(), _reference(q, k, v, mask, d**-0.5), rtol=1e-5, atol=1e-5)

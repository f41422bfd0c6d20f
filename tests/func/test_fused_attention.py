"""KV attention as ONNX Runtime's GroupQueryAttention (``compile.onnxruntime.attention=auto``, the default).

The kernel (ONNX Runtime's CPU GroupQueryAttention) against its PyTorch statement (``gqa_reference``) on random
tensors; the eager fused model against the plain one; and built artifacts through qbuild's runtime against Hugging
Face ``generate`` on the same weights: batches, chunked prefill row by row, and a last chunk moved back inside a
context that is not a multiple of the bucket.
"""

from __future__ import annotations

import collections
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from qbuild.api import build, plan
from tests.conftest import ROOT

KV = ROOT / "manifests" / "tiny-llama-kv.yaml"


class _GQA(torch.nn.Module):
    def __init__(self, heads: int, kv_heads: int, scale: float, window: int | None, rope: bool,
                 softcap: float | None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.scale, self.window, self.rope = heads, kv_heads, scale, window, rope
        self.softcap = softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                seqlens: torch.Tensor, total: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
        from qbuild.transforms.models.llama import OrtGroupQueryAttention

        tables = (cos, sin) if self.rope else (None, None)
        return OrtGroupQueryAttention.apply(q, k, v, pk, pv, seqlens, total, *tables, self.heads, self.kv_heads,
                                            self.scale, self.window, self.softcap)


@pytest.mark.parametrize(("window", "rope", "d", "softcap"), [
    (None, False, 8, None), (None, True, 16, None), (3, True, 16, None), (3, False, 8, None), (None, False, 8, 0.5)])
def test_kernel_equals_its_pytorch_statement(window: int | None, rope: bool, d: int, softcap: float | None,
                                             tmp_path: Path) -> None:
    """First prompts of a padded batch, a later chunk of one row, and a decode step with an all-padding row: the
    ONNX Runtime kernel's output and the cache slots it wrote equal ``gqa_reference`` (1e-5). (Its rotary needs a
    head size that is a multiple of 16.)"""
    import numpy as np
    import onnxruntime as ort

    heads, kv_heads, ctx = 4, 2, 16
    torch.manual_seed(0)
    model = _GQA(heads, kv_heads, 0.3, window, rope, softcap)
    cos, sin = torch.randn(ctx, d // 2), torch.randn(ctx, d // 2)
    example = (torch.randn(2, 3, heads * d), torch.randn(2, 3, kv_heads * d), torch.randn(2, 3, kv_heads * d),
               torch.randn(2, kv_heads, ctx, d), torch.randn(2, kv_heads, ctx, d),
               torch.tensor([2, 2], dtype=torch.int32), torch.tensor(3, dtype=torch.int32), cos, sin)
    path = tmp_path / "gqa.onnx"
    names = ["q", "k", "v", "pk", "pv", "seqlens", "total", "cos", "sin"]
    dims = {"q": {0: "b", 1: "s"}, "k": {0: "b", 1: "s"}, "v": {0: "b", 1: "s"}, "pk": {0: "b"}, "pv": {0: "b"},
            "seqlens": {0: "b"}}
    torch.onnx.export(model, example, str(path), input_names=names, output_names=["o", "k_out", "v_out"],
                      dynamic_axes=dims, opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cases = [(2, 3, [0, 0]), (1, 4, [5]), (3, 1, [4, 15, 9])]  # (batch, seq, each row's first slot)
    for b, s, first in cases:
        q, k, v = torch.randn(b, s, heads * d), torch.randn(b, s, kv_heads * d), torch.randn(b, s, kv_heads * d)
        pk, pv = torch.randn(b, kv_heads, ctx, d), torch.randn(b, kv_heads, ctx, d)
        seqlens = torch.tensor([f + s - 1 for f in first], dtype=torch.int32)
        total = seqlens.max() + 1
        want = model(q, k, v, pk, pv, seqlens, total, cos, sin)
        feed = dict(zip(names, (t.numpy() for t in (q, k, v, pk, pv, seqlens, total, cos, sin)), strict=True))
        got = session.run(None, {n: x for n, x in feed.items() if n in {i.name for i in session.get_inputs()}})
        np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-5, err_msg=f"{b, s, first}")
        for row, f in enumerate(first):  # the slots written and those before them (the kernel leaves the rest)
            for out, ref in zip(got[1:], want[1:], strict=True):
                np.testing.assert_allclose(out[row, :, :f + s], ref[row, :, :f + s].numpy(), atol=1e-6)


def _tiny(family: str = "llama") -> Any:
    from tests.func.test_kv_cache import tiny_model

    return tiny_model(family)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "grok1", "gpt2"])
def test_eager_fused_model_equals_plain(family: str) -> None:
    """The fused forward (its PyTorch statement, run eagerly) gives the plain forward's logits and valid cache slots:
    a right-padded prefill from empty caches, then a decode step with one row finished (position -1)."""
    from qbuild.transforms import apply_transforms
    from qbuild.transforms.models.llama import fused_attention

    model = _tiny(family)
    apply_transforms(model, ["kv_cache"])
    heads, head_dim = model.kv_cache_shape()
    ctx_len, n = 24, model.kv_num_layers()
    empty = [torch.zeros(2, heads, ctx_len, head_dim) for _ in range(2 * n)]
    ids = torch.randint(3, 500, (2, 12))
    pos = torch.tensor([list(range(12)), list(range(5)) + [-1] * 7])
    with torch.no_grad():
        plain = model(ids, pos, *empty)
        with fused_attention(model) as why:
            assert why is None
            fused = model(ids, pos, *empty)
        torch.testing.assert_close(fused[0], plain[0], atol=1e-5, rtol=0)
        for a, b in zip(fused[1:], plain[1:], strict=True):
            torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(a[1, :, :5], b[1, :, :5], atol=1e-6, rtol=0)
        step_ids, step_pos = torch.tensor([[7], [9]]), torch.tensor([[12], [-1]])
        plain = model(step_ids, step_pos, *plain[1:])
        with fused_attention(model):
            fused = model(step_ids, step_pos, *fused[1:])
    torch.testing.assert_close(fused[0][0], plain[0][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama4"])
def test_other_families_keep_their_ops(family: str) -> None:
    from qbuild.transforms import apply_transforms
    from qbuild.transforms.models.llama import fused_attention

    model = _tiny(family)
    apply_transforms(model, ["kv_cache"])
    with fused_attention(model) as why:
        assert why and family in why
    assert "kv_fused" not in model.__dict__


def _ops(compiled: Path) -> collections.Counter[str]:
    import onnx

    graph = onnx.load(str(compiled / "model.onnx"), load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


@pytest.mark.slow
def test_fused_build_equals_plain_and_hf(tmp_path: Path) -> None:
    """Both forms verify (greedy tokens == HF generate: a batch of two prompts, the longer in several chunks, row by
    row in the fused form); the fused graph has one GroupQueryAttention a layer and no cache scatter, and the runtime
    is told to write the caches in place. Switching the form re-exports; the load is reused."""
    common = ["seq.lengths=[4,8]", "seq.ctx_len=96", "verify.max_new_tokens=24",
              'verify.prompts=["My name is", "Once upon a time there was a little girl who lived in a village"]']
    fused = build(KV, common, cache_dir=tmp_path)
    switched = plan(KV, [*common, "compile.onnxruntime.attention=plain"], cache_dir=tmp_path)
    assert (switched.stage("load").state, switched.stage("export").state) == ("cached", "build")
    plain = build(KV, [*common, "compile.onnxruntime.attention=plain"], cache_dir=tmp_path)
    reports = [json.loads(Path(r.artifacts["report"]).read_text()) for r in (fused, plain)]
    assert reports[0]["tokens"] == reports[1]["tokens"] and reports[0]["prefill_chunks"] >= 2
    f_ops, p_ops = _ops(Path(fused.artifacts["compiled"])), _ops(Path(plain.artifacts["compiled"]))
    assert f_ops["GroupQueryAttention"] == 2 and not f_ops["ScatterElements"] and not f_ops["RotaryEmbedding"]
    assert not p_ops["GroupQueryAttention"] and p_ops["ScatterElements"]
    assert sum(f_ops.values()) < sum(p_ops.values()) / 2
    sessions = [json.loads((Path(r.artifacts["compiled"]) / "session.json").read_text()) for r in (fused, plain)]
    assert sessions[0]["kv_attention"] == "group_query" and "kv_attention" not in sessions[1]


@pytest.mark.slow
@pytest.mark.parametrize("session", ["dynamic", "fixed"])
def test_runtime_equals_hf_with_the_last_chunk_moved_back(session: str, tmp_path: Path) -> None:
    """A context of 30 with prefill chunks of 8: a 27-token prompt's fourth chunk would write slots 24..31, so it
    starts at 22 instead. Alone and batched with a short prompt (prefilled row by row), in dynamic and fixed-shape
    sessions, the greedy tokens equal HF ``generate`` on the same weights."""
    from transformers import AutoModelForCausalLM

    from qbuild.runtime.generate import KVRuntime
    from qbuild.transforms.kv_cache import KVCausalLM

    result = build(KV, ["seq.lengths=[8]", "seq.ctx_len=30", "verify.enabled=false",
                        f"compile.onnxruntime.session={session}"], cache_dir=tmp_path)
    runtime = KVRuntime(Path(result.artifacts["compiled"]), ctx_len=30, buckets=[8])
    assert runtime.in_place
    hf = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    assert not isinstance(hf, KVCausalLM)
    g = torch.Generator().manual_seed(1)
    long, short = torch.randint(3, 500, (27,), generator=g).tolist(), torch.randint(3, 500, (5,), generator=g).tolist()

    def hf_tokens(prompt: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()

    alone = runtime.generate([long], 3, None)
    assert alone.chunks == 4 and alone.tokens == [hf_tokens(long, 3)]
    batch = runtime.generate([short, copy.copy(long)], 3, None)
    assert batch.tokens == [hf_tokens(short, 3), hf_tokens(long, 3)]

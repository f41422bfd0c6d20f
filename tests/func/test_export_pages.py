"""The export's memory pieces of issue 16: weights' pages handed back once used, the initializer de-duplication
pass given only the weights that can have a twin, and the output head exported as column blocks.

Each is checked against the real thing: the kernel's own RSS counters, the exporter's own de-duplication
(tests/func/test_export_lean.py compares whole graphs), and greedy tokens / logits of Hugging Face.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.func.test_kv_cache import (
    ATOL,
    NEW_TOKENS,
    PROMPTS,
    cache_shape,
    hf_greedy,
    kv_greedy,
    ort_step,
    tiny_model,
    torch_step,
)


def _rss() -> dict[str, int]:
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in lines) if k in ("RssFile", "RssAnon")}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_release_pages_drops_file_pages_and_keeps_every_value(tmp_path: Path) -> None:
    import torch

    from qbuild.tasks.export_common import release_pages

    n = 8 << 20  # 32 MiB of float32
    (tmp_path / "w.bin").write_bytes(np.arange(n, dtype=np.float32).tobytes())
    t = torch.from_file(str(tmp_path / "w.bin"), shared=False, size=n, dtype=torch.float32)  # a private map
    before = _rss()["RssFile"]
    assert float(t.sum(dtype=torch.float64)) == n * (n - 1) / 2  # every page read
    touched = _rss()["RssFile"]
    if touched - before < 24 << 20:
        pytest.skip("the file's pages did not show in RssFile here")
    t[5] = -1.0  # a modified (copy-on-write) page: must never be lost
    release_pages([t])
    released = _rss()["RssFile"]
    if touched - released < 24 << 20:
        pytest.skip("this kernel does not take MADV_PAGEOUT (Linux >= 5.4)")
    assert float(t[5]) == -1.0
    expected = torch.arange(n, dtype=torch.float32)
    expected[5] = -1.0
    assert torch.equal(t, expected)  # read back from the file, the modified page kept
    a = torch.randn(8 << 20)  # anonymous memory: not advised at all (see the next test), its values unchanged
    b = a.clone()
    release_pages([a, a[::2]])
    assert torch.equal(a, b)


def test_file_ranges_tell_file_mappings_from_anonymous_memory(tmp_path: Path) -> None:
    import bisect

    import torch

    from qbuild.tasks.export_common import file_ranges

    (tmp_path / "w.bin").write_bytes(bytes(4 << 20))
    mapped = torch.from_file(str(tmp_path / "w.bin"), shared=False, size=1 << 20, dtype=torch.float32)
    anon = torch.zeros(1 << 20)

    def inside(t: Any) -> bool:
        ranges = file_ranges()
        i = bisect.bisect_right(ranges, (t.data_ptr(), float("inf"))) - 1
        return i >= 0 and ranges[i][0] <= t.data_ptr() < ranges[i][1]

    if not Path("/proc/self/maps").exists():
        assert file_ranges() == []
        return
    assert inside(mapped) and not inside(anon)


def _by_value_twins(params: dict[str, Any]) -> set[str]:
    """What torch's DeduplicateInitializersByValue can merge: same dtype, shape, strides and values."""
    import torch

    out: set[str] = set()
    for (a, x), (b, y) in itertools.combinations(params.items(), 2):
        if x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride() and torch.equal(x, y):
            out |= {a, b}
    return out


def test_maybe_duplicates_never_misses_a_twin() -> None:
    import torch

    from qbuild.tasks.export_common import _maybe_duplicates

    gen = torch.Generator().manual_seed(0)
    for case in range(40):
        base = torch.randn(300, 200, generator=gen)
        params: dict[str, Any] = {"base": base, "other": torch.randn(300, 200, generator=gen)}
        near = base.clone()
        near[150, 100] += 1.0  # the same first and last values, one differs in the middle
        params["near"] = near
        if case % 2:
            params["clone"] = base.clone()
        if case % 3 == 0:
            params["view"] = base  # the same storage (a tied head)
            params["t1"], params["t2"] = base.t(), base.clone().t()  # folded transposes: the same layout
        if case % 5 == 0:
            params["ones1"], params["ones2"] = torch.ones(64), torch.ones(64)  # small: compared whole
            params["bf"], params["bf2"] = base[:4].bfloat16(), base[:4].bfloat16()
        if case % 7 == 0:
            params["strided"] = base[:, ::2]  # not dense: the pass judges it
        maybe = _maybe_duplicates(params)
        assert _by_value_twins(params) <= maybe, case
        assert "other" not in maybe  # a weight with no twin is not compared (its pages are not read)
        assert {"base", "near"} <= maybe  # the same sampled values: only the pass's full compare tells them apart


def _check_blocks(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocks: int) -> None:
    import onnx

    from qbuild.tasks.kv_causal_lm import export_kv_causal_lm
    from qbuild.transforms import apply_transforms, kv_cache

    monkeypatch.setattr(kv_cache, "head_block_count", lambda model, weight: blocks)
    model = tiny_model(family)
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    apply_transforms(model, ["kv_cache"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shape = cache_shape(model)
    _tokens, pt_logits = kv_greedy(torch_step(model), shape, PROMPTS, NEW_TOKENS)
    info = export_kv_causal_lm(model, tmp_path, exporter="legacy", opset=17)
    assert info["graph_form"]["head_blocks"] == blocks
    # put back: the model's own parameters, bytes and names, as before the export
    assert "kv_head_blocks" not in dict(model.named_modules())
    after = model.state_dict()
    assert list(after) == list(state) and all(after[k].equal(v) for k, v in state.items())
    graph = onnx.load(str(tmp_path / info["onnx"]), load_external_data=False).graph
    vocab, hidden = int(model.config.vocab_size), int(model.config.hidden_size)
    size = -(-vocab // blocks)  # torch.split's blocks: all of this size but the last
    sizes = [size] * (blocks - 1) + [vocab - size * (blocks - 1)]
    dims = {i.name: list(i.dims) for i in graph.initializer}
    head = [dims[n.input[1]][1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in dims
            and dims[n.input[1]][0] == hidden and dims[n.input[1]][1] in sizes]
    assert sorted(head) == sorted(sizes)
    assert [hidden, vocab] not in dims.values()  # the whole head is not in the graph as well
    tokens, ort_logits = kv_greedy(ort_step(tmp_path / info["onnx"]), shape, PROMPTS, NEW_TOKENS, chunk=8)
    assert tokens == expected
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ort_logits, pt_logits, strict=True))
    assert diff < ATOL, diff


@pytest.mark.parametrize(("family", "blocks"), [("llama", 5), ("gpt2", 3)])
def test_head_blocks_give_hf_tokens(family: str, blocks: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The head as uneven column blocks (Llama: 512 = 4 x 103 + 100): ONNX Runtime's greedy tokens equal HF's,
    logits within ATOL of the PyTorch model; GPT-2's head is tied to its embedding (the blocks are views of it)."""
    _check_blocks(family, tmp_path, monkeypatch, blocks)


def test_head_block_count() -> None:
    import torch

    from qbuild.transforms.kv_cache import HEAD_BLOCK_BYTES, head_block_count

    model = torch.nn.Sequential(torch.nn.Linear(768, 2048, bias=False), torch.nn.Linear(768, 32000, bias=False))
    assert head_block_count(model, model[1].weight) == -(-768 * 32000 * 4 // HEAD_BLOCK_BYTES)  # 6 at 125M
    big = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False), torch.nn.Linear(256, 1000, bias=False))
    assert head_block_count(big, big[1].weight) == 1  # a head smaller than the other weights stays whole


ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rotary_embedding_op_gives_hf_tokens(rope: str, tmp_path: Path) -> None:
    """The ONNX Runtime graph rotates q and k with com.microsoft RotaryEmbedding (2 nodes a layer, no Neg) for
    RoPE types whose cos/sin are fixed per position; greedy tokens of a left-padded batch (padding positions -1)
    equal HF's and logits are within ATOL of PyTorch. ``dynamic`` RoPE changes with the length: plain ops."""
    import onnx
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qbuild.tasks.kv_causal_lm import export_kv_causal_lm
    from qbuild.transforms import apply_transforms
    from qbuild.transforms.models.llama import ROPE_TABLES

    spec = tiny_model("llama").config.to_dict()
    spec["rope_parameters"] = ROPES[rope]
    config = AutoConfig.for_model("llama", **{k: v for k, v in spec.items() if k != "model_type"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().requires_grad_(False)
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    apply_transforms(model, ["kv_cache"])
    shape = cache_shape(model)
    _tokens, pt_logits = kv_greedy(torch_step(model), shape, PROMPTS, NEW_TOKENS)
    info = export_kv_causal_lm(model, tmp_path, exporter="legacy", opset=17)
    assert not any(hasattr(model, n) for n in ROPE_TABLES)  # put back
    ops = [n.op_type for n in onnx.load(str(tmp_path / info["onnx"]), load_external_data=False).graph.node]
    layers = shape[0]
    if rope == "dynamic":
        assert "rotary" not in info["graph_form"] and "RotaryEmbedding" not in ops and "Neg" in ops
    else:
        assert info["graph_form"]["rotary"] and ops.count("RotaryEmbedding") == 2 * layers and "Neg" not in ops
    tokens, ort_logits = kv_greedy(ort_step(tmp_path / info["onnx"]), shape, PROMPTS, NEW_TOKENS, chunk=8)
    assert tokens == expected
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ort_logits, pt_logits, strict=True))
    assert diff < ATOL, diff


def test_rope_tables_only_for_types_onnx_runtime_rotates() -> None:
    """ONNX Runtime's CPU RotaryEmbedding runs float32 and float16: a bfloat16 model keeps the plain ops, and the
    tables come in the model's dtype (a float32 table would turn float16 keys into float32 ones)."""
    import torch

    from qbuild.transforms import apply_transforms
    from qbuild.transforms.models.llama import ROPE_TABLES, rope_tables

    for dtype, expected in ((torch.bfloat16, False), (torch.float16, True), (torch.float32, True)):
        model = tiny_model("llama").to(dtype)
        apply_transforms(model, ["kv_cache"])
        with rope_tables(model) as applies:
            assert applies is expected, dtype
            if applies:
                assert all(getattr(model, n).dtype == dtype for n in ROPE_TABLES)
        assert not any(hasattr(model, n) for n in ROPE_TABLES)


def test_rope_tables_have_a_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with so many positions that its tables would pass ROPE_TABLE_MAX_BYTES keeps the plain ops (the
    tiny Llama: 256 positions x head_dim 16 x 4 bytes = 16 KiB for both tables)."""
    from qbuild.transforms import apply_transforms
    from qbuild.transforms.models import llama

    model = tiny_model("llama")
    apply_transforms(model, ["kv_cache"])
    monkeypatch.setattr(llama, "ROPE_TABLE_MAX_BYTES", 256 * 16 * 4)
    with llama.rope_tables(model) as applies:
        assert applies
    monkeypatch.setattr(llama, "ROPE_TABLE_MAX_BYTES", 256 * 16 * 4 - 1)
    with llama.rope_tables(model) as applies:
        assert not applies


@pytest.mark.parametrize("attention", ["auto", "plain"])
def test_float16_kv_build_runs_on_onnx_runtime(attention: str, tmp_path: Path) -> None:
    """A float16 KV model builds for ONNX Runtime end to end: the graph rotates in float16 (inside
    GroupQueryAttention, or with RotaryEmbedding in the plain form), the runtime allocates float16 caches (it fed
    float32 ones before: 'Unexpected input data type'), and verify's greedy tokens equal transformers' generate on
    the same float16 weights."""
    import json

    import onnx

    from tests.conftest import ROOT, run_qbuild

    cache = tmp_path / "cache"
    out = run_qbuild(str(ROOT / "manifests" / "tiny-llama-kv.yaml"), "model.dtype=float16",
                     f"compile.onnxruntime.attention={attention}", "--json", cache=cache, check=True)
    summary = json.loads(out.stdout.splitlines()[-1])
    assert {s["name"]: s["state"] for s in summary["stages"]}["verify"] == "built"
    (onnx_path,) = (cache / "objects" / "export").glob("*/out/model.onnx")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    assert [i.type.tensor_type.elem_type for i in graph.input if i.name == "past_key.0"] == [onnx.TensorProto.FLOAT16]
    if attention == "plain":
        assert sum(n.op_type == "RotaryEmbedding" for n in graph.node) == 4
    else:
        fused = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
        assert len(fused) == 2 and all(onnx.helper.get_attribute_value(a) == 1 for n in fused
                                       for a in n.attribute if a.name == "do_rotary")
        assert not any(n.op_type == "RotaryEmbedding" for n in graph.node)


def test_bfloat16_on_onnx_runtime_fails_with_a_hint(tmp_path: Path) -> None:
    """ONNX Runtime's CPU kernels do not run bfloat16: the compile error says so and names model.dtype."""
    from tests.conftest import ROOT, run_qbuild

    proc = run_qbuild(str(ROOT / "manifests" / "tiny-llama-kv.yaml"), "model.dtype=bfloat16", cache=tmp_path / "c")
    assert proc.returncode == 6, proc.stderr
    assert "hint: the graph is bfloat16" in proc.stderr and "model.dtype=float32" in proc.stderr

"""SwiftKV: qbuild's own implementation (qbuild/models/llama_swiftkv.py) pinned fact by fact on a tiny random
config, then its retained-state KV rewrite (qbuild/transforms/models/llama_swiftkv.py) and a build.

Each architectural fact is checked against an independent float64 re-computation written here with plain torch
ops from the state dict (not against the code under test): later layers' keys/values come from
``k/v_proj_swiftkv(norm_swiftkv(h))`` with ``h`` the hidden state after layer ``num_key_value_layers - 1``, keys
rotated and values not; their queries from ``q_proj_swiftkv``; the last position equals running every layer
on every token; ``key_value_group_size`` layers share one projection; generation with the cache equals full
recomputation; the KV graph runs the later layers for the last token only and gives the same logits.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.func.test_kv_cache import PROMPTS, hf_greedy, kv_greedy, ort_step, torch_step
from tests.func.test_qaic_graph import CTX, QAIC, RMS, graph_ops, int32_max_in_graph, sdk  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

TINY_YAML = ROOT / "qbuild" / "conf" / "model" / "tiny-llama-swiftkv.yaml"
N_KV = 2  # num_key_value_layers of the tiny config (4 layers)

#: Snowflake/Llama-3.1-SwiftKV-8B-Instruct config.json as the reference lists it (qefficient-modes.md 3.7)
PUBLIC_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaSwiftKVForCausalLM"], "model_type": "llama_swiftkv",
    "swiftkv": True, "num_key_value_layers": 16, "key_value_group_size": 1,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
    "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.44.2",
}
_HPARAMS = ["swiftkv", "num_key_value_layers", "key_value_group_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings",
            "tie_word_embeddings"]


@pytest.fixture(scope="module")
def swiftkv() -> Any:
    from qbuild.models import llama_swiftkv

    llama_swiftkv.register()
    return llama_swiftkv


@pytest.fixture(scope="module")
def tiny_overrides() -> dict[str, Any]:
    return dict(yaml.safe_load(TINY_YAML.read_text())["config"])


def make_model(overrides: dict[str, Any], seed: int = 0) -> Any:
    """A random tiny SwiftKV model whose RMSNorm weights are random too (so a skipped or swapped norm shows)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama_swiftkv", **overrides),
                                         attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m.requires_grad_(False)


@pytest.fixture(scope="module")
def model(swiftkv: Any, tiny_overrides: dict[str, Any]) -> Any:
    return make_model(tiny_overrides)


@pytest.fixture(scope="module")
def grouped(swiftkv: Any, tiny_overrides: dict[str, Any]) -> Any:
    """6 layers: 2 plain, then two groups of 2 SwiftKV layers sharing one k/v projection each."""
    return make_model({**tiny_overrides, "num_hidden_layers": 6, "key_value_group_size": 2}, seed=1)


def _ids(batch: int = 2, seq: int = 12, seed: int = 1) -> Any:
    import torch

    return torch.randint(3, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- config, registration, weight names ---------------------------------------------------------------


def test_config_reads_the_public_checkpoints_keys(swiftkv: Any, tmp_path: Path) -> None:
    from huggingface_hub.errors import StrictDataclassClassValidationError
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert "llama_swiftkv" in list(CONFIG_MAPPING.keys())  # qbuild.models.source checks this list
    (tmp_path / "config.json").write_text(json.dumps(PUBLIC_CONFIG))
    c = AutoConfig.from_pretrained(tmp_path)
    assert type(c) is swiftkv.LlamaSwiftKVConfig
    assert {k: getattr(c, k) for k in _HPARAMS} == {k: PUBLIC_CONFIG[k] for k in _HPARAMS}
    assert c.rope_parameters["rope_type"] == "llama3" and c.rope_parameters["rope_theta"] == 500000.0
    assert c.rope_parameters["factor"] == 8.0
    default = swiftkv.LlamaSwiftKVConfig(num_hidden_layers=6)  # QEfficient's defaults
    assert (default.swiftkv, default.num_key_value_layers, default.key_value_group_size) == (False, 6, 1)
    invalid = StrictDataclassClassValidationError
    with pytest.raises(invalid, match="key_value_group_size 3 must be >= 1 and divide the 4 SwiftKV layers"):
        swiftkv.LlamaSwiftKVConfig(num_hidden_layers=6, num_key_value_layers=2, key_value_group_size=3)
    with pytest.raises(invalid, match="num_key_value_layers 0 must be in 1..num_hidden_layers"):
        swiftkv.LlamaSwiftKVConfig(num_hidden_layers=6, num_key_value_layers=0)


def test_auto_classes_and_weight_names(model: Any, grouped: Any) -> None:
    assert type(model).__name__ == "LlamaSwiftKVForCausalLM"  # the checkpoint's architectures entry
    names = set(model.state_dict())
    plain = {f"model.layers.0.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    later = {f"model.layers.{N_KV}.self_attn.{p}.weight"
             for p in ("q_proj_swiftkv", "k_proj_swiftkv", "v_proj_swiftkv", "o_proj")}
    mlp = {f"model.layers.{N_KV}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    norms = {f"model.layers.{N_KV}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
    assert {k for k in names if k.startswith("model.layers.0.self_attn.")} == plain
    assert {k for k in names if k.startswith(f"model.layers.{N_KV}.")} == later | mlp | norms
    assert {k for k in names if not k.startswith("model.layers.")} == {
        "model.embed_tokens.weight", "model.norm.weight", "model.norm_swiftkv.weight", "lm_head.weight"}
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # tie_word_embeddings false
    # key_value_group_size 2: only the first layer of each group owns the k/v projections
    owners = sorted({int(k.split(".")[2]) for k in grouped.state_dict() if "k_proj_swiftkv" in k})
    assert owners == [2, 4]
    assert all(f"model.layers.{i}.self_attn.q_proj_swiftkv.weight" in grouped.state_dict() for i in range(2, 6))


# ---- one fact at a time, against float64 -----------------------------------------------------------------


def test_later_layers_kv_come_from_norm_swiftkv_of_layer_n_minus_1(model: Any) -> None:
    import torch

    ids = _ids(seq=10)
    out = model(ids, use_cache=True)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    ref = _ref_forward(sd, model.config, ids)
    for i in range(4):  # every layer's cache, plain and SwiftKV, equals the float64 reference
        torch.testing.assert_close(out.cache.layers[i].keys.double(), ref["k"][i], rtol=0, atol=1e-4)
        torch.testing.assert_close(out.cache.layers[i].values.double(), ref["v"][i], rtol=0, atol=1e-4)
    # layer 3's keys are not its own input's (h after layer 2), and the norm is norm_swiftkv, not its input norm
    h_in3 = ref["h"][N_KV + 1]  # entering layer 3: after layer 2
    own = _rotate(_heads(_rms(h_in3, sd["model.norm_swiftkv.weight"], model.config) @ sd[
        "model.layers.3.self_attn.k_proj_swiftkv.weight"].T, 2), _pos(ids), model.config)
    assert (own - ref["k"][3]).abs().max() > 1e-2
    other_norm = _rms(ref["h"][N_KV], sd["model.layers.2.input_layernorm.weight"], model.config)
    v_other = _heads(other_norm @ sd["model.layers.2.self_attn.v_proj_swiftkv.weight"].T, 2)
    assert (v_other - ref["v"][2]).abs().max() > 1e-2


def test_keys_are_rotated_values_are_not(model: Any) -> None:
    import torch

    ids = _ids(batch=1, seq=9)
    out = model(ids, use_cache=True)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = _rms(_ref_forward(sd, model.config, ids)["h"][N_KV], sd["model.norm_swiftkv.weight"], model.config)
    k_raw = _heads(x @ sd["model.layers.2.self_attn.k_proj_swiftkv.weight"].T, 2)
    v_raw = _heads(x @ sd["model.layers.2.self_attn.v_proj_swiftkv.weight"].T, 2)
    torch.testing.assert_close(out.cache.layers[2].values.double(), v_raw, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.cache.layers[2].keys.double(), _rotate(k_raw, _pos(ids), model.config),
                               rtol=0, atol=1e-4)
    assert (out.cache.layers[2].keys.double() - k_raw)[:, :, 1:].abs().max() > 1e-2  # position 0 is not rotated


def test_full_forward_matches_independent_float64_reference(model: Any) -> None:
    import torch

    ids = _ids(seq=11)
    expected = _ref_forward({k: v.double() for k, v in model.state_dict().items()}, model.config, ids)["logits"]
    torch.testing.assert_close(model(ids, use_cache=False).logits.double(), expected, rtol=0, atol=1e-4)


def test_prefill_runs_later_layers_for_the_last_token_only_with_the_same_output(model: Any) -> None:
    import torch

    ids = _ids(seq=12)
    seen: dict[int, Any] = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].shape))
             for i, layer in enumerate(model.model.layers)]
    try:
        last = model(ids, use_cache=True, logits_to_keep=1).logits
    finally:
        for hook in hooks:
            hook.remove()
    assert [tuple(seen[i]) for i in range(4)] == [(2, 12, 64)] * N_KV + [(2, 1, 64)] * (4 - N_KV)
    full = model(ids, use_cache=False).logits  # every layer on every token
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-5)
    ref = _ref_forward({k: v.double() for k, v in model.state_dict().items()}, model.config, ids)["logits"]
    torch.testing.assert_close(last.double(), ref[:, -1:], rtol=0, atol=1e-4)


def test_key_value_group_size_shares_one_projection(grouped: Any) -> None:
    import torch

    ids = _ids(seq=8, seed=4)
    out = grouped(ids, use_cache=True)
    layers = out.cache.layers
    for leader in (2, 4):
        assert torch.equal(layers[leader].keys, layers[leader + 1].keys)
        assert torch.equal(layers[leader].values, layers[leader + 1].values)
    assert (layers[2].keys - layers[4].keys).abs().max() > 1e-2  # two groups, two projections
    sd = {k: v.double() for k, v in grouped.state_dict().items()}
    ref = _ref_forward(sd, grouped.config, ids)
    torch.testing.assert_close(out.logits.double(), ref["logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(layers[5].keys.double(), ref["k"][5], rtol=0, atol=1e-4)


def test_llama3_rope_scaling_bands_all_occur(model: Any) -> None:
    """The tiny config keeps the checkpoint's llama3 RoPE scaling with every wavelength band present."""
    import torch

    inv, base = _inv_freq(model.config)
    ratio = inv / base
    assert (ratio == 1).any() and (ratio == 1 / 8).any() and ((ratio > 1 / 8) & (ratio < 1)).any()
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), inv, rtol=1e-6, atol=0)


# ---- generation and persistence --------------------------------------------------------------------------


def test_greedy_generate_with_cache_equals_recomputation(model: Any) -> None:
    import torch

    ids = _ids(batch=2, seq=11, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding: the second prompt is 7 tokens
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    assert out.cache.get_seq_length() == 11 + 15
    seq, m = ids.clone(), mask.clone()
    for _ in range(16):  # no cache, every layer on every token
        pos = (m.cumsum(-1) - 1).clamp_min(0)
        logits = model(seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1]
        logits[:, model.generation_config.eos_token_id] = float("-inf")  # as generate's min_new_tokens
        nxt = logits.argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert out.sequences[:, 11:].tolist() == seq[:, 11:].tolist()
    assert min(len(set(row)) for row in seq[:, 11:].tolist()) >= 4  # varied tokens
    alone = model.generate(ids[1:, 4:], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert alone[0, 7:].tolist() == out.sequences[1, 11:].tolist()


def test_save_load_and_random_init_of_the_tiny_manifest(swiftkv: Any, model: Any, tiny_overrides: dict[str, Any],
                                                        tmp_path: Path) -> None:
    import torch

    from qbuild.models.source import init_random, load_model

    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "llama_swiftkv" and saved["architectures"] == ["LlamaSwiftKVForCausalLM"]
    assert (saved["num_key_value_layers"], saved["key_value_group_size"], saved["swiftkv"]) == (2, 1, True)
    ids = _ids()
    loaded = load_model(tmp_path / "saved", "causal_lm", "float32")
    assert type(loaded) is type(model)
    assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    info = init_random("llama_swiftkv", tiny_overrides, seed=0, dtype="float32", out_dir=tmp_path / "init")
    assert info["model_type"] == "llama_swiftkv" and info["architectures"] == ["LlamaSwiftKVForCausalLM"]


# ---- the retained-state KV rewrite -----------------------------------------------------------------------


def test_kv_graph_prefill_logits_and_caches_match_float64(model: Any) -> None:
    """The KV module: last-token logits and every layer's cache slots equal the float64 reference, and the
    later layers see one token per row."""
    import numpy as np
    import torch

    from qbuild.transforms import apply_transforms

    kv = copy.deepcopy(model)
    apply_transforms(kv, ["kv_cache"])
    ids = _ids(batch=2, seq=9, seed=5)
    pos = torch.arange(9).repeat(2, 1)
    ids[1, :3], pos[1] = 0, torch.tensor([-1, -1, -1, 0, 1, 2, 3, 4, 5])  # left padding on row 1
    caches = [np.zeros((2, 2, 16, 16), np.float32) for _ in range(8)]
    seen: list[Any] = []
    hook = kv.model.layers[N_KV].mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    try:
        logits, new = torch_step(kv)(ids.numpy(), pos.numpy(), caches)
    finally:
        hook.remove()
    assert [tuple(s) for s in seen] == [(2, 1, 64)]  # the later layers' MLP: the last token of each row only
    sd = {k: v.double() for k, v in model.state_dict().items()}
    for row, start in ((0, 0), (1, 3)):
        ref = _ref_forward(sd, model.config, ids[row:row + 1, start:])
        np.testing.assert_allclose(logits[row, 0], ref["logits"][0, -1].numpy(), atol=1e-4)
        for i in range(4):
            np.testing.assert_allclose(new[2 * i][row, :, :9 - start], ref["k"][i][0].numpy(), atol=1e-4)
            np.testing.assert_allclose(new[2 * i + 1][row, :, :9 - start], ref["v"][i][0].numpy(), atol=1e-4)


@pytest.mark.parametrize("options", [[], ["compile.qaic.use_onnx_subfunctions=true"]], ids=["qaic", "sub-functions"])
def test_qaic_graph_form_ort_runs_to_hf_tokens(options: list[str], sdk: Path, tmp_path: Path) -> None:  # noqa: F811
    """A qaic build (stand-in compiler): every layer's cache through CtxScatter/CtxGather (the later layers' too,
    through the same kv_update hook), every RMSNorm CustomRMSNorm (norm_swiftkv included); ORT gives HF's tokens."""
    from qbuild.api import build
    from tests.func.test_qaic_graph import hf_model

    r = build(ROOT / "manifests" / "tiny-llama-swiftkv.yaml", [*QAIC, *options], cache_dir=tmp_path / "cache")
    onnx_path = Path(r.artifacts["onnx"])
    graph, ops = graph_ops(onnx_path)
    if not options:
        assert ops[CTX[0]] == ops[CTX[1]] == 2 * 4 and ops[RMS] == 4 * 2 + 2  # + final norm and norm_swiftkv
        assert int32_max_in_graph(graph)
    else:  # the plain layers are one function; the SwiftKV layers stay in the graph with the invalid index 0
        assert ops[("qbuild.transforms.kv_cache", "KVLlamaDecoderLayer")] == N_KV
        assert ops[CTX[0]] == ops[CTX[1]] == 2 * (4 - N_KV) and not int32_max_in_graph(graph)
    assert [o.name for o in graph.graph.output][1:3] == ["past_key.0_RetainedState", "past_value.0_RetainedState"]
    hf = hf_model_swiftkv(r.artifacts["model"], hf_model)
    expected = [hf_greedy(copy.deepcopy(hf), p, 12) for p in PROMPTS]
    got, _ = kv_greedy(ort_step(onnx_path), (4, 2, 16), PROMPTS, 12, chunk=8)
    assert got == expected


def test_build_verifies_greedy_tokens_against_generate(tmp_path: Path) -> None:
    """The tiny manifest builds offline and its verify stage compares the artifact with our ``generate``."""
    from qbuild.api import build

    r = build(ROOT / "manifests" / "tiny-llama-swiftkv.yaml", ["verify.max_new_tokens=8"], cache_dir=tmp_path)
    report = json.loads(Path(r.artifacts["report"]).read_text())
    assert len(report["tokens"]) == len(report["prompts"]) and all(len(t) == 8 for t in report["tokens"])


def hf_model_swiftkv(directory: str, loader: Any) -> Any:
    from qbuild.models.llama_swiftkv import register

    register()  # test_qaic_graph.hf_model registers Grok-1 only
    return loader(directory)


# ---- independent re-computations (float64) ----------------------------------------------------------------


def _pos(ids: Any) -> Any:
    import torch

    return torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)


def _rms(x: Any, w: Any, c: Any) -> Any:
    return w * x / ((x * x).mean(-1, keepdim=True) + c.rms_norm_eps).sqrt()


def _heads(x: Any, n: int) -> Any:
    """``[B, S, n*D] -> [B, n, S, D]``."""
    b, s, _ = x.shape
    return x.view(b, s, n, -1).transpose(1, 2)


def _inv_freq(c: Any) -> tuple[Any, Any]:
    """Llama 3 scaled inverse frequencies and the unscaled ones, written from the published formula."""
    import torch

    r = c.rope_parameters
    d = c.hidden_size // c.num_attention_heads
    base = r["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    old, low, high, factor = (r["original_max_position_embeddings"], r["low_freq_factor"], r["high_freq_factor"],
                              r["factor"])
    out = []
    for f in base.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64), base


def _rotate(t: Any, pos: Any, c: Any) -> Any:
    """Rotate-half RoPE on ``t [B, h, S, D]``: pairs (i, i + D/2) turn by pos * inv_freq[i]."""
    import torch

    ang = pos[:, None, :, None].double() * _inv_freq(c)[0]
    d = t.shape[-1]
    a, b = t[..., : d // 2], t[..., d // 2 :]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)


def _attend(q: Any, k: Any, v: Any, c: Any) -> Any:
    """Causal GQA attention of ``q [B, Hq, S, D]`` over ``k, v [B, Hkv, S, D]``; returns ``[B, S, Hq*D]``."""
    import torch

    b, hq, s, d = q.shape
    group = [j // (hq // k.shape[1]) for j in range(hq)]
    scores = q @ k[:, group].transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    return (probs @ v[:, group]).transpose(1, 2).reshape(b, s, hq * d)


def _mlp(sd: dict[str, Any], p: str, x: Any) -> Any:
    gate = x @ sd[p + "mlp.gate_proj.weight"].T
    return (gate * (1 / (1 + (-gate).exp())) * (x @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T


def _ref_forward(sd: dict[str, Any], c: Any, ids: Any) -> dict[str, Any]:
    """SwiftKV in float64 from the state dict, every layer on every token, causal, no padding: logits
    ``[B, S, V]``, every layer's rotated keys and values ``[B, Hkv, S, D]``, the hidden state entering each
    layer (``h[i]``; ``h[n]`` is the one after layer n-1)."""
    nh, nkv, n = c.num_attention_heads, c.num_key_value_heads, c.num_key_value_layers
    pos = _pos(ids)
    x = sd["model.embed_tokens.weight"][ids]
    keys, values, hidden = [], [], []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        hidden.append(x)
        h = _rms(x, sd[p + "input_layernorm.weight"], c)
        if i < n:
            q = _heads(h @ sd[p + "self_attn.q_proj.weight"].T, nh)
            k = _heads(h @ sd[p + "self_attn.k_proj.weight"].T, nkv)
            v = _heads(h @ sd[p + "self_attn.v_proj.weight"].T, nkv)
        else:
            if i == n:
                xs = _rms(x, sd["model.norm_swiftkv.weight"], c)  # the hidden state after layer n-1, normed
            leader = f"model.layers.{i - (i - n) % c.key_value_group_size}.self_attn."
            q = _heads(h @ sd[p + "self_attn.q_proj_swiftkv.weight"].T, nh)
            k = _heads(xs @ sd[leader + "k_proj_swiftkv.weight"].T, nkv)
            v = _heads(xs @ sd[leader + "v_proj_swiftkv.weight"].T, nkv)
        q, k = _rotate(q, pos, c), _rotate(k, pos, c)
        keys.append(k)
        values.append(v)
        x = x + _attend(q, k, v, c) @ sd[p + "self_attn.o_proj.weight"].T
        x = x + _mlp(sd, p, _rms(x, sd[p + "post_attention_layernorm.weight"], c))
    logits = _rms(x, sd["model.norm.weight"], c) @ sd["lm_head.weight"].T
    return {"logits": logits, "k": keys, "v": values, "h": hidden}

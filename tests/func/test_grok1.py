"""Grok-1: qbuild's own implementation (qbuild/models/grok1.py) pinned fact by fact on a tiny random config.

Each architectural fact is checked against a small independent re-computation written here with plain
torch ops (not against the code under test); the whole forward is re-computed in float64 from the
state dict. Generation with the KV cache is checked against full recomputation without a cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "qbuild" / "conf" / "model" / "tiny-grok1.yaml"

#: hpcai-tech/grok-1 config.json (as published; the remote-code keys included)
PUBLIC_CONFIG: dict[str, Any] = {
    "architectures": ["Grok1ModelForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_grok1.Grok1Config", "AutoModel": "modeling_grok1.Grok1Model",
                 "AutoModelForCausalLM": "modeling_grok1.Grok1ModelForCausalLM"},
    "vocab_size": 131072, "hidden_size": 6144, "intermediate_size": 32768, "num_hidden_layers": 64,
    "num_attention_heads": 48, "num_key_value_heads": 8, "attn_output_multiplier": 0.08838834764831845,
    "embedding_multiplier_scale": 78.38367176906169, "output_multiplier_scale": 0.5773502691896257,
    "max_attn_value": 30.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "use_cache": True,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True,
    "num_experts_per_tok": 2, "num_experts": 8, "output_router_logits": False, "router_aux_loss_coef": 0.001,
    "torch_dtype": "bfloat16", "transformers_version": "4.35.0",
}
_HPARAMS = [k for k in PUBLIC_CONFIG if k not in ("architectures", "auto_map", "torch_dtype", "transformers_version")]


@pytest.fixture(scope="module")
def grok() -> Any:
    from qbuild.models import grok1

    grok1.register()
    return grok1


@pytest.fixture(scope="module")
def tiny_overrides() -> dict[str, Any]:
    return dict(yaml.safe_load(TINY_YAML.read_text())["config"])


@pytest.fixture(scope="module")
def model(grok: Any, tiny_overrides: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model("grok-1", **tiny_overrides)).eval()
    with torch.no_grad():  # norms start at ones: make every `scale` random so a missing multiply shows
        for name, p in m.named_parameters():
            if name.endswith(".scale"):
                p.uniform_(0.5, 1.5)
    return m.requires_grad_(False)


def _ids(batch: int = 2, seq: int = 12, seed: int = 1) -> Any:
    import torch

    return torch.randint(3, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- config and registration -------------------------------------------------------------------------


def test_config_defaults_are_the_public_checkpoints(grok: Any, tmp_path: Path) -> None:
    from transformers import AutoConfig

    default = grok.Grok1Config()
    assert default.model_type == "grok-1"
    for key in _HPARAMS:
        assert getattr(default, key) == PUBLIC_CONFIG[key], key
    # the checkpoint's own config.json (no model_type, auto_map to its remote code): read without running it
    (tmp_path / "config.json").write_text(json.dumps(PUBLIC_CONFIG))
    loaded = grok.checkpoint_config(tmp_path)
    assert type(loaded) is grok.Grok1Config
    assert {k: getattr(loaded, k) for k in _HPARAMS} == {k: PUBLIC_CONFIG[k] for k in _HPARAMS}
    assert loaded.architectures == ["Grok1ModelForCausalLM"]
    # with a model_type (as save_pretrained writes it) AutoConfig resolves it on its own
    (tmp_path / "config.json").write_text(json.dumps({**PUBLIC_CONFIG, "model_type": "grok-1"}))
    auto = AutoConfig.from_pretrained(tmp_path)
    assert type(auto) is grok.Grok1Config
    assert {k: getattr(auto, k) for k in _HPARAMS} == {k: PUBLIC_CONFIG[k] for k in _HPARAMS}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert grok.checkpoint_config(tmp_path) is None


def test_auto_classes_resolve_grok1(grok: Any, tiny_overrides: dict[str, Any]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    grok.register()  # idempotent
    grok.register()
    assert "grok-1" in list(CONFIG_MAPPING.keys())  # qbuild.models.source checks this list
    config = AutoConfig.for_model("grok-1", **tiny_overrides)
    assert type(config) is grok.Grok1Config
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is grok.Grok1ForCausalLM is grok.Grok1ModelForCausalLM
    assert type(model).__name__ == "Grok1ModelForCausalLM"  # what save_pretrained writes to architectures


def test_weight_names_match_public_checkpoint(model: Any) -> None:
    layer0 = {k for k in model.state_dict() if k.startswith("model.layers.0.")}
    expected = {f"model.layers.0.attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    expected |= {f"model.layers.0.{n}.scale" for n in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm",
                                                        "post_moe_norm")}
    expected.add("model.layers.0.moe_block.gate.weight")
    expected |= {f"model.layers.0.moe_block.experts.{e}.{p}.weight" for e in range(4)
                 for p in ("linear", "linear_1", "linear_v")}
    assert layer0 == expected
    rest = {k for k in model.state_dict() if not k.startswith("model.layers.")}
    assert rest == {"model.embed_tokens.weight", "model.norm.scale", "lm_head.weight"}


# ---- one fact at a time ------------------------------------------------------------------------------


def test_rmsnorm_fp32_times_scale_no_offset(grok: Any) -> None:
    import torch

    norm = grok.Grok1RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.scale.copy_(torch.randn(64))
    x = (torch.randn(3, 5, 64) * 7).to(torch.bfloat16)
    xf = x.float()
    expected = (norm.scale * xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    with torch.no_grad():
        norm.scale.zero_()  # no +1 offset: a zero scale zeroes the output
    assert torch.count_nonzero(norm(x)) == 0


def test_sandwich_norms(model: Any) -> None:
    import copy

    import torch

    layer = copy.deepcopy(model.model.layers[0])
    x = torch.randn(2, 6, 64)
    pos = torch.arange(6)[None].expand(2, -1)
    rope = _rope(pos, 16)
    causal = torch.full((6, 6), torch.finfo(torch.float32).min).triu(1)[None, None]

    def attn_branch(h: Any) -> Any:
        return layer.post_attn_norm(layer.attn(layer.pre_attn_norm(h), rope, causal)[0])

    def moe_branch(h: Any) -> Any:
        return layer.post_moe_norm(layer.moe_block(layer.pre_moe_norm(h))[0])

    h = x + attn_branch(x)
    torch.testing.assert_close(layer(x, rope, causal), h + moe_branch(h), rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.post_attn_norm.scale.zero_()  # the attention branch then contributes nothing
    torch.testing.assert_close(layer(x, rope, causal), x + moe_branch(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.post_moe_norm.scale.zero_()
    assert torch.equal(layer(x, rope, causal), x)


def test_attention_softcap_bounds_scores(model: Any) -> None:
    import copy

    import torch

    attn = copy.deepcopy(model.model.layers[0].attn)
    with torch.no_grad():  # large q/k so that raw scores reach the hundreds
        attn.q_proj.weight.mul_(8)
        attn.k_proj.weight.mul_(8)
    x = torch.randn(1, 8, 64)
    pos = torch.arange(8)[None]
    causal = torch.full((8, 8), torch.finfo(torch.float32).min).triu(1)[None, None]
    _, probs = attn(x, _rope(pos, 16), causal)  # [1, 4, 8, 8]

    raw = _ref_scores(attn, x, pos) * 0.25  # independent q k^T * attn_output_multiplier
    capped = 30.0 * torch.tanh(raw / 30.0)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    assert raw[..., mask].abs().max() > 100  # the cap is active in this test
    assert capped.abs().max() <= 30  # (float64 tanh saturates to exactly 1 far out)
    expected = torch.softmax(capped.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(probs, expected.float(), rtol=0, atol=1e-5)
    # log-probabilities within a row differ by at most 2 * 30: the scores were bounded to [-30, 30]
    logp = probs.double().log()
    spans = [(logp[0, h, i, : i + 1].max() - logp[0, h, i, : i + 1].min()).item() for h in range(4) for i in range(8)]
    assert max(spans) <= 60 + 1e-3
    uncapped = torch.softmax(raw.masked_fill(~mask, float("-inf")), dim=-1)
    assert (uncapped.float() - probs).abs().max() > 1e-2


def test_router_softmax_top2_without_renormalisation(model: Any) -> None:
    import torch
    import torch.nn.functional as F

    moe = model.model.layers[0].moe_block
    x = torch.randn(2, 5, 64)
    out, router_logits = moe(x)
    t = x.reshape(-1, 64).double()
    probs = torch.softmax(t @ moe.gate.weight.double().T, dim=-1)  # all 4 experts
    expected = torch.zeros_like(t)
    norm_variant = torch.zeros_like(t)
    for i in range(t.shape[0]):
        w, e = probs[i].topk(2)
        assert w.sum() < 1  # not renormalised: the other experts keep some mass
        for wk, ek in zip(w, e.tolist(), strict=True):
            y = _ref_expert(moe.experts[ek], t[i])
            expected[i] += wk * y
            norm_variant[i] += wk / w.sum() * y
    torch.testing.assert_close(router_logits.double(), t @ moe.gate.weight.double().T, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.reshape(-1, 64).double(), expected, rtol=0, atol=1e-5)
    assert (out.reshape(-1, 64).double() - norm_variant).abs().max() > 1e-3
    assert F.softmax(router_logits, -1).topk(2).values.sum(-1).max() < 1


def test_expert_is_gated_exact_gelu(model: Any) -> None:
    import torch
    import torch.nn.functional as F

    expert = model.model.layers[0].moe_block.experts[1]
    x = torch.randn(7, 64) * 3
    torch.testing.assert_close(expert(x).double(), _ref_expert(expert, x.double()), rtol=1e-5, atol=1e-4)
    tanh_gelu = F.linear(F.gelu(F.linear(x, expert.linear.weight), approximate="tanh")
                         * F.linear(x, expert.linear_v.weight), expert.linear_1.weight)
    assert (expert(x) - tanh_gelu).abs().max() > 1e-4  # exact (erf) GELU, not the tanh approximation


def test_embedding_and_output_multipliers(model: Any) -> None:
    import torch

    ids = _ids()
    seen = {}

    def grab(_module: Any, args: tuple[Any, ...]) -> None:
        seen["x"] = args[0]

    hook = model.model.layers[0].register_forward_pre_hook(grab)
    try:
        out = model(ids, use_cache=False)
    finally:
        hook.remove()
    emb = model.model.embed_tokens.weight
    assert model.config.embedding_multiplier_scale == 0.5 and model.config.output_multiplier_scale != 1
    torch.testing.assert_close(seen["x"], emb[ids] * 0.5, rtol=0, atol=0)
    hidden = model.model(ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(out.logits, hidden @ emb.T * model.config.output_multiplier_scale, rtol=0, atol=1e-5)


def test_full_forward_matches_independent_float64_reference(model: Any) -> None:
    import torch

    ids = _ids(seq=10)
    expected = _ref_forward({k: v.double() for k, v in model.state_dict().items()}, model.config, ids)
    logits = model(ids, use_cache=False).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=0, atol=1e-4)


def test_tied_embeddings_are_one_tensor(model: Any, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_gqa_shapes(model: Any) -> None:
    attn = model.model.layers[0].attn
    assert tuple(attn.q_proj.weight.shape) == (4 * 16, 64)
    assert tuple(attn.k_proj.weight.shape) == (2 * 16, 64)
    assert tuple(attn.v_proj.weight.shape) == (2 * 16, 64)
    assert tuple(attn.o_proj.weight.shape) == (64, 4 * 16)
    out = model(_ids(batch=2, seq=9), use_cache=True)
    assert out.cache.get_seq_length() == 9
    for layer in out.cache.layers:
        assert tuple(layer.keys.shape) == (2, 2, 9, 16)  # [batch, kv_heads, seq, head_dim]
        assert tuple(layer.values.shape) == (2, 2, 9, 16)


# ---- generation and persistence ----------------------------------------------------------------------


def test_greedy_generate_with_cache_equals_recomputation(model: Any) -> None:
    import torch

    ids = _ids(batch=2, seq=11, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding: the second prompt is 7 tokens
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    assert out.cache.get_seq_length() == 11 + 15  # decoded with a growing DynamicCache

    seq, m = ids.clone(), mask.clone()
    for _ in range(16):  # no cache: the whole sequence every step
        pos = (m.cumsum(-1) - 1).clamp_min(0)
        logits = model(seq, attention_mask=m, position_ids=pos, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert out.sequences[:, 11:].tolist() == seq[:, 11:].tolist()
    assert min(len(set(row)) for row in seq[:, 11:].tolist()) >= 4  # varied tokens, not one repeated
    # the padded prompt generates what it generates alone
    alone = model.generate(ids[1:, 4:], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert alone[0, 7:].tolist() == out.sequences[1, 11:].tolist()


def test_save_load_round_trip_identical_logits(model: Any, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from qbuild.models.grok1 import checkpoint_config as grok1_checkpoint_config
    from qbuild.models.source import load_model

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "grok-1" and saved["architectures"] == ["Grok1ModelForCausalLM"]
    ids = _ids()
    expected = model(ids, use_cache=False).logits
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert torch.equal(loaded(ids, use_cache=False).logits, expected)
    # with the checkpoint's auto_map to its remote code, our registered classes still load it
    saved.update(auto_map=PUBLIC_CONFIG["auto_map"])
    (tmp_path / "config.json").write_text(json.dumps(saved))
    engine = load_model(tmp_path, "causal_lm", "float32")
    assert type(engine) is type(model)
    assert torch.equal(engine(ids, use_cache=False).logits, expected)
    # and with no model_type at all (as the public config.json): through checkpoint_config
    del saved["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    public = AutoModelForCausalLM.from_pretrained(tmp_path, config=grok1_checkpoint_config(tmp_path))
    assert type(public) is type(model)
    assert torch.equal(public(ids, use_cache=False).logits, expected)


def test_engine_random_init_of_tiny_manifest(grok: Any, tiny_overrides: dict[str, Any], tmp_path: Path) -> None:
    from qbuild.models.source import init_random, load_model

    info = init_random("grok-1", tiny_overrides, seed=0, dtype="float32", out_dir=tmp_path)
    assert info["model_type"] == "grok-1" and info["architectures"] == ["Grok1ModelForCausalLM"]
    again = init_random("grok-1", tiny_overrides, seed=0, dtype="float32", out_dir=tmp_path / "again")
    assert info["num_parameters"] == again["num_parameters"]
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    loaded = load_model(tmp_path, "causal_lm", "float32")
    assert loaded.config.max_attn_value == 30.0 and loaded.config.num_experts == 4


# ---- independent re-computations -----------------------------------------------------------------------


def _rope(pos: Any, head_dim: int) -> Any:
    """cos, sin [B, S, D] written from the formula (pairs i and i + D/2 rotate by pos * 10000^(-2i/D))."""
    import torch

    inv = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = pos[..., None].double() * inv
    return torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()


def _rotate(t: Any, pos: Any) -> Any:
    """Rotate-half RoPE on t [B, h, S, D] (float64)."""
    import torch

    d = t.shape[-1]
    ang = pos[:, None, :, None].double() * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = t[..., : d // 2], t[..., d // 2 :]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)


def _ref_scores(attn: Any, x: Any, pos: Any) -> Any:
    """q k^T per query head [B, H, S, S] in float64 (KV head = query head // group size)."""
    b, s, _ = x.shape
    q = (x.double() @ attn.q_proj.weight.double().T).view(b, s, 4, 16).transpose(1, 2)
    k = (x.double() @ attn.k_proj.weight.double().T).view(b, s, 2, 16).transpose(1, 2)
    q, k = _rotate(q, pos), _rotate(k, pos)
    k = k[:, [h // 2 for h in range(4)]]
    return q @ k.transpose(-1, -2)


def _ref_expert(expert: Any, t: Any) -> Any:
    return _gated_gelu(expert.linear.weight, expert.linear_v.weight, expert.linear_1.weight, t)


def _gated_gelu(w_linear: Any, w_v: Any, w_1: Any, t: Any) -> Any:
    """w_1 (gelu(w_linear t) * (w_v t)) in float64, GELU written from erf."""
    import torch

    up = t @ w_linear.double().T
    gelu = 0.5 * up * (1 + torch.special.erf(up / math.sqrt(2)))
    return (gelu * (t @ w_v.double().T)) @ w_1.double().T


def _ref_forward(sd: dict[str, Any], c: Any, ids: Any) -> Any:
    """Grok-1 logits [B, S, V] in float64 from the state dict, causal, no padding."""
    import torch

    def rms(x: Any, w: Any) -> Any:
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps)

    b, s = ids.shape
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    pos = torch.arange(s)[None].expand(b, -1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    x = sd["model.embed_tokens.weight"][ids] * c.embedding_multiplier_scale
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "pre_attn_norm.scale"])
        q = _rotate((h @ sd[p + "attn.q_proj.weight"].T).view(b, s, nh, hd).transpose(1, 2), pos)
        k = _rotate((h @ sd[p + "attn.k_proj.weight"].T).view(b, s, nkv, hd).transpose(1, 2), pos)
        v = (h @ sd[p + "attn.v_proj.weight"].T).view(b, s, nkv, hd).transpose(1, 2)
        group = [j // (nh // nkv) for j in range(nh)]
        scores = q @ k[:, group].transpose(-1, -2) * c.attn_output_multiplier
        scores = c.max_attn_value * torch.tanh(scores / c.max_attn_value)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        o = (probs @ v[:, group]).transpose(1, 2).reshape(b, s, nh * hd) @ sd[p + "attn.o_proj.weight"].T
        x = x + rms(o, sd[p + "post_attn_norm.scale"])
        h = rms(x, sd[p + "pre_moe_norm.scale"]).reshape(-1, c.hidden_size)
        router = torch.softmax(h @ sd[p + "moe_block.gate.weight"].T, -1)
        moe = torch.zeros_like(h)
        for t in range(h.shape[0]):
            w, experts = router[t].topk(c.num_experts_per_tok)
            for wk, e in zip(w, experts.tolist(), strict=True):
                ex = p + f"moe_block.experts.{e}."
                moe[t] += wk * _gated_gelu(sd[ex + "linear.weight"], sd[ex + "linear_v.weight"],
                                           sd[ex + "linear_1.weight"], h[t])
        x = x + rms(moe.view(b, s, -1), sd[p + "post_moe_norm.scale"])
    x = rms(x, sd["model.norm.scale"])
    return x @ sd["model.embed_tokens.weight"].T * c.output_multiplier_scale


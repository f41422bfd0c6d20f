"""Causal LMs the Cloud AI 100 way, end to end through the engine: KV-cache export, buckets, generate.

The verify stage itself asserts that the compiled artifact's greedy tokens equal Hugging Face
``generate(do_sample=False)`` on the same weights; these tests drive it per family with a batch of
prompts of different lengths, one longer than the smallest bucket (chunked prefill), 32 new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qbuild.api import build, plan, run
from qbuild.errors import RunError
from tests.conftest import ROOT, run_qbuild

pytestmark = pytest.mark.slow
KV = ROOT / "manifests" / "tiny-llama-kv.yaml"
PROMPTS = ["My name is", "Once upon a time there was a little girl who lived in a village near the forest"]
FAMILIES = {
    "tiny-llama": [], "tiny-mistral": [], "tiny-qwen2": [], "tiny-qwen3": [], "tiny-gpt2": [],
    "tiny-gemma3": [], "tiny-grok1": [],
    "tiny-llama4": ["export.exporter=dynamo", "export.opset=18"],  # complex RoPE rewrite: dynamo only
}


def _family_overrides(model: str) -> list[str]:
    return [f"model={model}", "seq.lengths=[4,8]", "seq.ctx_len=96", "verify.max_new_tokens=32",
            "verify.prompts=" + json.dumps(PROMPTS), *FAMILIES[model]]


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_family_tokens_equal_hf_generate(model: str, tmp_path: Path) -> None:
    result = build(KV, _family_overrides(model), cache_dir=tmp_path)
    assert [s["state"] for s in result.stages] == ["built"] * 4  # verify built == tokens matched HF
    report = json.loads(Path(result.artifacts["report"]).read_text())
    assert report["prompt_tokens"][0] < 8 < report["prompt_tokens"][1]
    assert report["prefill_chunks"] >= 2  # longer than the largest bucket: prefilled in chunks of 8
    eos = json.loads((Path(result.model_dir) / "config.json").read_text()).get("eos_token_id")
    for tokens in report["tokens"]:
        assert len(tokens) == 32 or tokens[-1] == eos
    session = json.loads((Path(result.artifacts["compiled"]) / "session.json").read_text())
    assert session["inputs"][0]["name"] == "input_ids"
    # compile.onnxruntime.attention=auto: GroupQueryAttention, the caches written in place, where the family allows
    fused = model != "tiny-llama4"  # chunked attention
    assert (session.get("kv_attention") == "group_query") == fused, session.get("kv_attention")


def test_run_from_fresh_then_warm_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run_qbuild("run", str(KV), "--prompt", "My name is", "--max-new-tokens", "16", cache=cache, check=True)
    assert first.stdout.startswith("My name is") and len(first.stdout.strip()) > len("My name is")
    assert "export     built" in first.stderr and "compile    built" in first.stderr
    second = run_qbuild("run", str(KV), "--prompt", "My name is", "--max-new-tokens", "16", "--json",
                        cache=cache, check=True)
    states = [json.loads(ln) for ln in second.stderr.splitlines() if ln.startswith("{")]
    assert not [e for e in states if e["event"] == "stage_built"]
    out = json.loads(second.stdout)
    assert out["results"][0]["prompt"] == "My name is" and len(out["results"][0]["tokens"]) <= 16
    assert first.stdout.strip() == "My name is" + out["results"][0]["text"]


def test_batch_equals_single_prompts_and_streams_in_order(tmp_path: Path) -> None:
    streamed: dict[int, str] = {}
    batch = run(KV, ["seq.lengths=[8,32]"], prompts=PROMPTS, max_new_tokens=20, cache_dir=tmp_path,
                on_text=lambda row, text: streamed.__setitem__(row, streamed.get(row, "") + text))
    assert batch.stats["prefill_chunks"] == 1  # the smallest bucket that holds the longest prompt: 32
    chunked = run(KV, ["seq.lengths=[4]"], prompts=PROMPTS, max_new_tokens=20, cache_dir=tmp_path)
    assert chunked.stats["prefill_chunks"] >= 5 and chunked.tokens == batch.tokens
    singles = [run(KV, ["seq.lengths=[8,32]"], prompts=[p], max_new_tokens=20, cache_dir=tmp_path).tokens[0]
               for p in PROMPTS]
    assert batch.tokens == singles
    assert [streamed.get(i, "") for i in range(2)] == batch.texts


def test_prompt_longer_than_context_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="exceeds seq.ctx_len=40"):
        run(KV, ["seq.lengths=[8]", "seq.ctx_len=40", "verify.enabled=false"], prompts=[PROMPTS[1]],
            max_new_tokens=30, cache_dir=tmp_path)
    proc = run_qbuild("run", str(KV), "--max-new-tokens", "4", cache=tmp_path)
    assert proc.returncode == 9 and "--prompt" in proc.stderr


def test_bucket_change_recompiles_without_reexport(tmp_path: Path) -> None:
    build(KV, ["verify.enabled=false"], cache_dir=tmp_path)
    p = plan(KV, ["verify.enabled=false", "seq.lengths=[16,64]"], cache_dir=tmp_path)
    assert {s.name: s.state for s in p.stages} == {"load": "cached", "export": "cached",
                                                   "compile": "build"}
    assert p.stage("compile").reasons == ["seq.lengths: [32, 128] -> [16, 64]"]


def test_fixed_shape_sessions_give_the_same_tokens(tmp_path: Path) -> None:
    common = ["seq.lengths=[4,8]", "verify.enabled=false"]
    dynamic = run(KV, [*common, "compile.onnxruntime.session=dynamic"], prompts=[PROMPTS[1]], max_new_tokens=12,
                  cache_dir=tmp_path)
    fixed = run(KV, [*common, "compile.onnxruntime.session=fixed"], prompts=[PROMPTS[1]], max_new_tokens=12,
                cache_dir=tmp_path)
    assert fixed.tokens == dynamic.tokens and fixed.stats["prefill_chunks"] >= 3
    auto = build(KV, common, cache_dir=tmp_path)
    choice = json.loads((Path(auto.artifacts["compiled"]).parent / "record.json").read_text())["meta"]["session"]
    assert choice["mode"] in ("fixed", "dynamic") and choice["reason"].startswith("measured")
    assert [t["name"] for t in choice["timings"]] == ["Prefill_0", "Prefill_1", "Decode"]


def test_verify_names_the_prompt_and_first_differing_token(tmp_path: Path) -> None:
    """The compiled artifact (seed 0) checked against other weights (seed 1) must fail verify clearly."""
    from qbuild.errors import VerifyError
    from qbuild.manifest import compose
    from qbuild.models.source import init_random
    from qbuild.models.tokenizer import train_bpe
    from qbuild.runtime import open_artifact
    from qbuild.stages.base import StageContext
    from qbuild.stages.verify import VerifyStage
    from qbuild.store import Store
    from qbuild.tasks import task_for

    built = build(KV, ["verify.enabled=false"], cache_dir=tmp_path / "cache")
    other = tmp_path / "other"
    config = compose(KV).manifest.model.config
    init_random("llama", dict(config), 1, "float32", other)
    train_bpe(config["vocab_size"], other)
    m = compose(KV, [f"model.path={other}", "~model.init", "~model.architecture", "~model.config", "~model.tokenizer",
                     "verify.max_new_tokens=8"]).manifest
    store = Store(tmp_path / "cache")
    task = task_for(m)
    params = VerifyStage(task).resolve(m, store.stats).params
    ctx = StageContext(tmp_path / "out", {}, {}, store)
    with pytest.raises(VerifyError, match=r"for prompt 'My name is' at new token \d+: expected \["):
        task.verify(params, ctx, open_artifact(Path(built.artifacts["compiled"])))


def test_run_refuses_an_artifact_it_cannot_execute_before_building(tmp_path: Path) -> None:
    sdk = ROOT / "tests" / "fixtures" / "fake-sdk"  # a compiler but no qaicrt: the QPC cannot run here
    proc = run_qbuild("run", str(KV), "compile.backend=qaic", f"compile.qaic.sdk_dir={sdk}", "--prompt", "Hi",
                      cache=tmp_path / "cache")
    assert proc.returncode == 9 and "cannot execute a qaic artifact" in proc.stderr
    assert not (tmp_path / "cache" / "objects").exists()


def test_the_entries_a_run_reads_are_held_against_cache_rm_until_it_ends(tmp_path: Path,
                                                                         warm_kv_export: Path) -> None:
    """run holds the build's use markers while it generates: a concurrent `qbuild cache rm` (or gc) skips the
    artifact then, and removes it once the run has ended."""
    from qbuild.store.maintenance import rm
    from tests.conftest import KV, copy_cache

    cache = copy_cache(warm_kv_export, tmp_path / "cache")
    fast = ["verify.enabled=false", "seq.lengths=[16]", "seq.ctx_len=64"]
    name = f"compile/{plan(KV, fast, cache_dir=cache).stage('compile').key}"
    seen: list[tuple[list[str], list[str]]] = []

    def on_text(_row: int, _text: str) -> None:  # called while the run generates
        if not seen:
            seen.append(rm(cache, [name]))

    run(KV, fast, prompts=["My name is"], max_new_tokens=4, cache_dir=cache, on_text=on_text)
    assert seen == [([], [name])]  # skipped: in use by the run
    assert rm(cache, [name]) == ([name], [])  # the run has ended: removed


def test_a_loaded_model_holds_its_entries_against_cache_rm_until_closed(tmp_path: Path,
                                                                         warm_kv_export: Path) -> None:
    """qbuild.load() returns a model that reads its artifact long after the build: the entries stay held (rm
    skips them) while it lives, and a model whose entries were held still generates; close() releases them."""
    from qbuild.api import load
    from qbuild.store.maintenance import rm
    from tests.conftest import KV, copy_cache

    cache = copy_cache(warm_kv_export, tmp_path / "cache")
    fast = ["verify.enabled=false", "seq.lengths=[16]", "seq.ctx_len=64"]
    name = f"compile/{plan(KV, fast, cache_dir=cache).stage('compile').key}"
    with load(KV, fast, cache_dir=cache) as model:
        assert rm(cache, [name]) == ([], [name])  # skipped: in use by the loaded model
        first = model.generate(prompts=["My name is"], generation_len=4)
        assert rm(cache, [name]) == ([], [name])
        assert first.generated_ids == model.generate(prompts=["My name is"], generation_len=4).generated_ids
    assert rm(cache, [name]) == ([name], [])  # closed: removed


def test_forced_logits_equal_hf_logits_on_the_same_history(tmp_path: Path) -> None:
    """``KVRuntime.forced_logits``: row i is the next-token logits after the prompt and ``tokens[:i]``; checked
    against one Hugging Face forward over prompt + tokens (1e-4), and its argmax against greedy generation."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from qbuild.runtime.generate import KVRuntime

    result = build(KV, ["seq.lengths=[8]", "seq.ctx_len=64", "verify.enabled=false"], cache_dir=tmp_path)
    rt = KVRuntime(Path(result.artifacts["compiled"]), ctx_len=64, buckets=[8])
    prompt = [5, 17, 99, 3, 250, 7, 8, 9, 10, 11, 12]  # longer than the bucket: chunked prefill
    tokens = rt.generate([prompt], 12, None).tokens[0]
    forced = rt.forced_logits(prompt, tokens)
    assert forced.shape[0] == len(tokens) and forced.dtype == np.float32
    assert forced.argmax(-1).tolist() == tokens  # fed its own greedy tokens, it picks them again
    hf = AutoModelForCausalLM.from_pretrained(result.model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float().numpy()
    np.testing.assert_allclose(forced, ref, atol=1e-4)
    other = [(t + 1) % forced.shape[1] for t in tokens]  # another history: other logits after the first row
    moved = rt.forced_logits(prompt, other)
    assert np.array_equal(moved[0], forced[0]) and not np.allclose(moved[1:], forced[1:], atol=1e-3)
    with pytest.raises(RunError, match="seq.ctx_len"):
        rt.forced_logits(prompt, [1] * 60)


def test_fixed_shape_sessions_stop_spinning_at_the_end_of_each_run(tmp_path: Path) -> None:
    """Fixed mode runs several sessions in turn: each one's threads stop spinning when its run ends, so that the
    next session (a prefill after a decode) gets the cores; the one session of dynamic mode keeps ONNX Runtime's
    default."""
    from qbuild.runtime.generate import KVRuntime

    entry = "session.force_spinning_stop"
    for mode, expected in (("fixed", "1"), ("dynamic", None)):
        result = build(KV, ["seq.lengths=[4,8]", "seq.ctx_len=128", "verify.enabled=false",
                            f"compile.onnxruntime.session={mode}"], cache_dir=tmp_path)
        rt = KVRuntime(Path(result.artifacts["compiled"]), ctx_len=128, buckets=[4, 8])
        rt.generate([list(range(3, 9))], 3, None)  # a prefill of 8 and decode steps
        opened = list(rt.sessions._open.values())
        assert len(opened) == (2 if mode == "fixed" else 1)
        def value(session: Any) -> str | None:
            try:
                return session.get_session_options().get_session_config_entry(entry)
            except RuntimeError:  # not set
                return None

        options = [value(s) for s in opened]
        assert options == [expected] * len(opened), (mode, options)

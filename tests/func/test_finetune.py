"""The finetune stage (LoRA with peft) between load and export: data formats and their errors, keys (the
training settings and the dataset's content, never its path; finetune=none changes nothing), training
(the loss falls, gradient checkpointing changes no loss, the merged weights generate the peft model's
tokens) and the one-command build (train, export, compile, verify; a second run fully cached)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qbuild.errors import PlanError, QBuildError
from qbuild.finetune.data import ALPACA_INPUT, DatasetError, read_examples
from qbuild.manifest.validate import to_manifest
from qbuild.plan.planner import resolve_stages
from qbuild.store import Store
from tests.conftest import ROOT, json_lines, quick_bench, run_qbuild
from tests.unit import test_key_property as kp

FIXTURES = ROOT / "tests" / "fixtures" / "finetune"
TINY_JSONL = FIXTURES / "tiny.jsonl"
KV = ROOT / "manifests" / "tiny-llama-kv.yaml"
LORA_MANIFEST = ROOT / "manifests" / "tiny-llama-lora.yaml"
LORA = {"model": kp.LLAMA, "transforms": {"apply": ["kv_cache"]},
        "finetune": {"method": "lora", "dataset": str(TINY_JSONL)}}


def _keys(data: dict[str, Any], store: Store) -> dict[str, str]:
    resolved, _ = resolve_stages(to_manifest(data), store)
    return {r.stage.name: r.key for r in resolved}


# --- data -------------------------------------------------------------------------------------------


def test_text_jsonl_and_alpaca_json_and_jsonl_are_read() -> None:
    text = read_examples(TINY_JSONL)
    assert len(text) == 40 and all(e.prompt == "" and e.completion for e in text)
    assert text[0].where == "line 1"
    alpaca = read_examples(FIXTURES / "alpaca.json")
    assert len(alpaca) == 12 and alpaca[0].where == "record 1"
    assert alpaca[1].prompt == ALPACA_INPUT.format(instruction="Add the two numbers.", input="2 and 3")
    assert alpaca[1].completion == "2 + 3 = 5"
    assert "### Input" not in alpaca[0].prompt and "### Response:" in alpaca[0].prompt
    assert [e.prompt for e in read_examples(FIXTURES / "alpaca.jsonl")] == [e.prompt for e in alpaca[:6]]


@pytest.mark.parametrize(("content", "fmt", "expected"), [
    ('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n', "auto", "line 3: not valid JSON"),
    ('{"text": "a"}\n\n{"body": "b"}\n', "auto", "line 3: no 'text' field (fields: body)"),
    ('{"text": "a"}\n["a list"]\n', "auto", "line 2: expected a JSON object, got list"),
    ('{"instruction": "x", "input": ""}\n', "alpaca", "line 1: an alpaca record without 'output'"),
    ('{"text": 3}\n', "auto", "line 1: field 'text' is int, expected a string"),
    ('[{"instruction": "x", "output": "y"},\n {"instruction": "x" "output": "y"}]', "auto", "line 2: not valid JSON"),
    ("\n\n", "auto", "holds no records"),
])
def test_a_bad_dataset_names_the_key_and_the_line(tmp_path: Path, content: str, fmt: str, expected: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError) as info:
        read_examples(path, fmt)
    assert str(info.value).startswith(f"finetune.dataset: {path}") and expected in str(info.value)
    assert info.value.key == "finetune.dataset" and info.value.hint


def test_a_saved_datasets_directory_is_read_and_keyed_by_its_files(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in TINY_JSONL.read_text().splitlines()]
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(tmp_path / "dd")
    examples = read_examples(tmp_path / "dd")
    assert [e.completion for e in examples] == [r["text"] for r in rows] and examples[1].where == "row 2"
    store = Store(tmp_path / "cache", readonly=True)
    resolved, _ = resolve_stages(to_manifest(kp.put(LORA, "finetune.dataset", str(tmp_path / "dd"))), store)
    finetune = next(r for r in resolved if r.stage.name == "finetune")
    assert set(finetune.resolved.sources) >= {"dataset/dataset_dict.json", "dataset/train/state.json"}
    bad = [{"text": "a", "body": None}, {"text": None, "body": "b"}]  # one schema: absent values are None
    datasets.Dataset.from_list(bad).save_to_disk(tmp_path / "bad")
    with pytest.raises(DatasetError, match=r"finetune.dataset: .*bad row 2: no 'text' field \(fields: body\)"):
        read_examples(tmp_path / "bad")


def test_a_missing_dataset_or_none_given_is_refused_at_plan_time(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache", readonly=True)
    with pytest.raises(PlanError, match=r"finetune.dataset: .*nowhere.jsonl does not exist"):
        _keys(kp.put(LORA, "finetune.dataset", str(tmp_path / "nowhere.jsonl")), store)
    with pytest.raises(QBuildError, match="finetune.dataset: required with finetune.method=lora"):
        _keys(kp.put(LORA, "finetune.dataset", None), store)
    with pytest.raises(QBuildError, match="lora trains a causal LM"):
        to_manifest({"model": {**kp.LLAMA, "architecture": "bert", "task": "embedding", "tokenizer": None},
                     "finetune": LORA["finetune"]})


# --- keys and the graph -----------------------------------------------------------------------------


def test_finetune_none_leaves_the_graph_and_every_key_unchanged(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache", readonly=True)
    base = {"model": kp.LLAMA, "transforms": {"apply": ["kv_cache"]}}
    before = _keys(base, store)
    assert list(before) == ["load", "export", "compile", "verify"]
    unused = kp.put(kp.put(base, "finetune", {"method": "none", "steps": 3, "lora": {"r": 2}}),
                    "finetune.dataset", str(TINY_JSONL))
    assert _keys(unused, store) == before
    _stages, notes = resolve_stages(to_manifest(unused), store)
    assert "finetune.steps: 3 is not used: finetune.method is none" in notes
    lora = _keys(LORA, store)
    assert list(lora) == ["load", "finetune", "export", "compile", "verify"]
    assert lora["load"] == before["load"] and all(lora[s] != before[s] for s in ("export", "compile", "verify"))


def test_a_key_changes_exactly_with_what_its_stage_read_with_finetune(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The key-property walk of tests/unit/test_key_property.py over every schema leaf, on a LoRA build:
    each training setting moves the finetune key (and what follows), nothing else does."""
    sdk = tmp_path / "sdk"
    shutil.copytree(kp.FAKE_SDK, sdk)
    world = {"bases": {"lora": LORA}, "store": Store(tmp_path / "cache", readonly=True),
             "files": {"compile.qaic.sdk_dir": sdk}}
    kp.test_a_key_changes_exactly_with_what_its_stage_read(world, "lora", monkeypatch)
    base = _keys(LORA, world["store"])
    for key, alt in [("finetune.steps", 31), ("finetune.learning_rate", 1e-3), ("finetune.lora.r", 4),
                     ("finetune.gradient_checkpointing", True), ("finetune.seed", 1), ("finetune.max_seq_len", 64),
                     ("finetune.lora.target_modules", ["q_proj"]), ("finetune.gradient_accumulation_steps", 2),
                     ("finetune.batch_size", 2), ("finetune.lora.alpha", 16.0), ("finetune.lora.dropout", 0.0),
                     ("finetune.epochs", 2), ("finetune.format", "text")]:
        keys = _keys(kp.put(LORA, key, alt), world["store"])
        assert keys["load"] == base["load"], key
        assert all(keys[s] != base[s] for s in ("finetune", "export", "compile", "verify")), key


def test_the_dataset_is_keyed_by_content_not_path(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache", readonly=True)
    base = _keys(LORA, store)
    same = _keys(kp.put(LORA, "finetune.dataset", str(kp.copy_of(TINY_JSONL, tmp_path, change=False))), store)
    changed = _keys(kp.put(LORA, "finetune.dataset", str(kp.copy_of(TINY_JSONL, tmp_path, change=True))), store)
    assert same == base
    assert changed["load"] == base["load"] and all(changed[s] != base[s] for s in ("finetune", "export", "verify"))


def test_the_override_and_the_shipped_manifest_compose_to_the_same_keys(tmp_path: Path) -> None:
    from qbuild.api import plan

    overrides = ["finetune=lora", "finetune.dataset=tests/fixtures/finetune/tiny.jsonl", "finetune.learning_rate=0.01",
                 "finetune.lora.target_modules=[q_proj,v_proj,lm_head]", "name=tiny-llama-lora"]
    a = plan(KV, overrides, cache_dir=tmp_path)
    b = plan(LORA_MANIFEST, cache_dir=tmp_path)
    assert [(s.name, s.key) for s in a.stages] == [(s.name, s.key) for s in b.stages]
    assert [s.name for s in b.stages] == ["load", "finetune", "export", "compile", "verify"]


# --- training (torch) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[list[int], list[int]]], Any]:
    """A random tiny Llama with a trained BPE (as the load stage makes it) and the tokenised tiny dataset."""
    from qbuild.finetune.data import tokenize
    from qbuild.models.source import init_random
    from qbuild.models.tokenizer import load_tokenizer, train_bpe

    d = tmp_path_factory.mktemp("base") / "model"
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
              "tie_word_embeddings": False}
    init_random("llama", config, 0, "float32", d)
    train_bpe(512, d)
    tok = load_tokenizer(d)
    return d, tokenize(read_examples(TINY_JSONL), tok, 64), tok



def _settings(**changes: Any) -> Any:
    from qbuild.finetune.lora import TrainSettings

    s = TrainSettings(steps=12, epochs=1, batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2,
                      weight_decay=0.0, gradient_checkpointing=False, seed=3, r=4, alpha=8.0, dropout=0.1,
                      target_modules=("q_proj", "v_proj", "lm_head"))
    return replace(s, **changes)


def _train(base: Any, **changes: Any) -> tuple[Any, list[dict[str, Any]]]:
    from qbuild.finetune import lora
    from qbuild.models.source import load_model

    directory, data, tok = base
    s = _settings(**changes)
    model = lora.apply_lora(load_model(directory, "causal_lm", "float32"), s)
    return model, lora.train(model, data, s, tok.pad_token_id)


@pytest.mark.slow
def test_the_loss_falls_and_gradient_checkpointing_changes_no_loss(base: Any) -> None:
    _model, plain = _train(base)
    _model, again = _train(base)
    _model, ckpt = _train(base, gradient_checkpointing=True)
    losses = [s["loss"] for s in plain]
    assert len(losses) == 12 and [s["loss"] for s in again] == losses  # seeded: the same run twice
    assert sum(losses[:3]) / 3 > sum(losses[-3:]) / 3 + 0.5, losses
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(plain, ckpt, strict=True)) <= 1e-5
    _model, other_seed = _train(base, seed=4)
    assert [s["loss"] for s in other_seed] != losses


@pytest.mark.slow
def test_epochs_and_accumulation_count_steps(base: Any) -> None:
    _model, steps = _train(base, steps=None, epochs=2, gradient_accumulation_steps=3)
    assert len(steps) == 7  # 2 x 10 batches of 4 = 20 micro-batches, 3 per step: 7 steps, the last of 2
    assert sum(s["tokens"] for s in steps) == 2 * sum(sum(x != -100 for x in y[1:]) for _ids, y in base[1])


@pytest.mark.slow
def test_the_merged_weights_generate_the_peft_models_tokens(base: Any, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from qbuild.finetune import lora
    from qbuild.models.source import load_model
    from qbuild.tasks.kv_causal_lm import hf_greedy

    directory, _data, tok = base
    model, _steps = _train(base)
    lora.save(model, directory, tmp_path / "adapter", tmp_path / "merged", torch.float32)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert {"tokenizer.json", "config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    peft_model = PeftModel.from_pretrained(load_model(directory, "causal_lm", "float32"), tmp_path / "adapter").eval()
    merged = load_model(tmp_path / "merged", "causal_lm", "float32")
    untrained = load_model(directory, "causal_lm", "float32")
    prompts = ["The cat", "A small robot", "Our team read"]
    want = [hf_greedy(peft_model, tok(p)["input_ids"], 12, tok) for p in prompts]
    assert [hf_greedy(merged, tok(p)["input_ids"], 12, tok) for p in prompts] == want
    assert [hf_greedy(untrained, tok(p)["input_ids"], 12, tok) for p in prompts] != want  # training did something


# --- the one-command build --------------------------------------------------------------------------


@pytest.mark.slow
def test_one_command_trains_exports_compiles_verifies_and_a_second_run_is_cached(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from qbuild.api import run
    from qbuild.models.source import load_model
    from qbuild.models.tokenizer import load_tokenizer
    from qbuild.tasks.kv_causal_lm import hf_greedy

    cache = tmp_path / "cache"
    args = [str(KV), "finetune=lora", "finetune.dataset=tests/fixtures/finetune/tiny.jsonl",
            "finetune.learning_rate=0.01", "finetune.lora.target_modules=[q_proj,v_proj,lm_head]"]
    proc = run_qbuild(*args, "--json", cache=cache, check=True)
    events = json_lines(proc.stdout)
    summary = events[-1]
    assert [(s["name"], s["state"]) for s in summary["stages"]] == [
        ("load", "built"), ("finetune", "built"), ("export", "built"), ("compile", "built"), ("verify", "built")]
    progress = [e["message"] for e in events if e.get("event") == "progress" and e["stage"] == "finetune"]
    assert any("step 30/30 loss" in m and "ETA" in m for m in progress), progress
    art = summary["artifacts"]
    curve = json.loads(Path(art["loss_curve"]).read_text())["steps"]
    assert len(curve) == 30 and curve[-1]["loss"] < curve[0]["loss"] - 1.0
    assert Path(art["loss_plot"]).read_bytes().startswith(b"\x89PNG")
    record = json.loads((Path(art["merged_model"]).parent.parent / "record.json").read_text())
    assert record["meta"]["peak_rss_bytes"] > 0 and record["meta"]["steps"] == 30

    # the compiled artifact's greedy tokens are the peft model's (base + adapter) tokens
    prompts = ["The cat", "My friend sang"]
    got = run(args[0], args[1:], prompts=prompts, max_new_tokens=12, cache_dir=cache)
    base_dir = Path(art["model"])
    tok = load_tokenizer(base_dir)
    peft_model = PeftModel.from_pretrained(load_model(base_dir, "causal_lm", "float32"), art["adapter"]).eval()
    with torch.no_grad():
        want = [hf_greedy(peft_model, tok(p)["input_ids"], 12, tok) for p in prompts]
    assert got.tokens == want

    again = run_qbuild(*args, "--json", cache=cache, check=True)
    assert [s["state"] for s in json_lines(again.stdout)[-1]["stages"]] == ["cached"] * 5
    code = ("import sys, json\nfrom qbuild.api import build\n"
            f"r = build({args[0]!r}, {args[1:]!r}, cache_dir={str(cache)!r})\n"
            "print(json.dumps({'states': [s['state'] for s in r.stages], 'heavy': sorted(m for m in "
            "('torch', 'transformers', 'peft', 'onnx', 'onnxruntime') if m in sys.modules)}))")
    cached = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(cached.stdout.splitlines()[-1]) == {"states": ["cached"] * 5, "heavy": []}


@pytest.mark.slow
def test_a_bad_line_fails_the_build_naming_the_key_and_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"txt": "a typo"}\n')
    proc = run_qbuild(str(KV), "finetune=lora", f"finetune.dataset={bad}", cache=tmp_path / "cache")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"finetune.dataset: {bad} line 3: no 'text' field (fields: txt)" in out and "Traceback" not in out


@pytest.mark.slow
def test_the_quick_bench_ends_with_one_json_line() -> None:
    last = quick_bench("finetune")
    assert last["losses_agree"] is True and last["max_loss_diff"] <= 1e-5
    assert last["plain_peak_rss_mb"] > 0 and last["ckpt_peak_rss_mb"] > 0
    assert last["plain_s_per_step"] > 0 and last["ckpt_s_per_step"] > 0

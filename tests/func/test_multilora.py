"""Several LoRA adapters served from one program (issue 15 part 2): manifests/tiny-llama-multilora.yaml built once
(random adapters with non-zero B, the verify stage against peft), then: the artifact's tokens per adapter and base
equal peft's in a mixed batch (checked here with peft directly, not only by verify), `qbuild run --adapter`, keys
(an adapter's bytes re-export, its location does not, no adapters changes no key), errors, and the qaic files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from qbuild.api import build, run
from qbuild.errors import LoadError, ManifestError, PlanError, RunError
from qbuild.manifest.validate import to_manifest
from qbuild.plan.planner import resolve_stages
from qbuild.store import Store
from tests.conftest import ROOT, run_qbuild
from tests.unit import test_key_property as kp

MANIFEST = ROOT / "manifests" / "tiny-llama-multilora.yaml"
FAST = ["seq.lengths=[16]", "seq.ctx_len=64", "verify.max_new_tokens=10", "compile.onnxruntime.session=dynamic"]
NAMES = ["base", "math", "poetry", "code"]
PROMPTS = ["My name is", "The quick brown fox jumps over the lazy dog and"]  # the verify prompts
KV = {"model": kp.LLAMA, "transforms": {"apply": ["kv_cache"]}}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One build of the multi-LoRA manifest (load, adapters, export, compile, verify) shared by the tests."""
    cache = tmp_path_factory.mktemp("multilora") / "cache"
    result = build(MANIFEST, FAST, cache_dir=cache)
    adapters = Path(result.artifacts["adapters"]).parent
    report = json.loads(Path(result.artifacts["report"]).read_text())
    return {"cache": cache, "result": result, "adapters": adapters, "report": report}


def peft_tokens(model_dir: Path, adapters: Path, prompt_adapters: list[tuple[str, str]], n: int) -> list[list[int]]:
    """peft's greedy tokens, one prompt at a time, with that adapter active (base: adapters disabled)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapters / "math",
                                      adapter_name="math")
    for name in ("poetry", "code"):
        model.load_adapter(adapters / name, adapter_name=name)
    out = []
    for prompt, name in prompt_adapters:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": n, "do_sample": False,
                  "pad_token_id": tok.eos_token_id}
        if name == "base":
            with model.disable_adapter(), torch.no_grad():
                out.append(model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist())
        else:
            model.set_adapter(name)
            with torch.no_grad():
                out.append(model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist())
    return out


def test_verify_checked_every_adapter_and_base_and_the_adapters_differ(built: dict[str, Any]) -> None:
    report = built["report"]
    assert report["adapters"] == NAMES and report["mixed_batch_rows"] == len(NAMES) * len(PROMPTS)
    first = [tuple(report["tokens"][n][0]) for n in NAMES]
    assert len(set(first)) == len(NAMES), "an adapter generates the base model's tokens: its B is zero"
    summary = json.loads((built["adapters"] / "adapters.json").read_text())
    assert [(a["id"], a["name"], a["scaling"]) for a in summary["adapters"]] == [
        (1, "math", 2.0), (2, "poetry", 2.0), (3, "code", 1.0)]


def test_a_mixed_batch_gives_peft_tokens_per_row(built: dict[str, Any]) -> None:
    rows = [(PROMPTS[0], "code"), (PROMPTS[1], "base"), (PROMPTS[0], "math"), ("Hello there", "poetry")]
    got = run(MANIFEST, FAST, prompts=[p for p, _ in rows], adapters=[a for _, a in rows], max_new_tokens=8,
              cache_dir=built["cache"])
    assert got.stats["lora_ids"] == [3, 0, 1, 2]
    model_dir = Path(built["result"].model_dir)
    assert got.tokens == peft_tokens(model_dir, built["adapters"], rows, 8)
    one = run(MANIFEST, FAST, prompts=PROMPTS, adapters=["poetry"], max_new_tokens=10, cache_dir=built["cache"])
    assert one.tokens == built["report"]["tokens"]["poetry"]  # one name: every prompt
    plain = run(MANIFEST, FAST, prompts=PROMPTS, max_new_tokens=10, cache_dir=built["cache"])
    assert plain.tokens == built["report"]["tokens"]["base"]  # no name: the base model


def test_a_mixed_batch_prefilled_row_by_row_gives_peft_tokens(built: dict[str, Any]) -> None:
    """Chunks of 4 tokens: a batch whose prompts need several chunks is prefilled one row at a time (fused
    attention, qbuild.runtime.generate), each row with its own adapter id; the tokens are still peft's."""
    rows = [(PROMPTS[1], "code"), (PROMPTS[0], "base"), (PROMPTS[1], "math")]
    got = run(MANIFEST, ["seq.lengths=[4]", *FAST[1:]], prompts=[p for p, _ in rows],
              adapters=[a for _, a in rows], max_new_tokens=8, cache_dir=built["cache"])
    assert got.stats["prefill_chunks"] >= 3 and got.stats["lora_ids"] == [3, 0, 1]
    assert got.tokens == peft_tokens(Path(built["result"].model_dir), built["adapters"], rows, 8)


def test_cli_run_adapter_streams_and_unknown_names_list_the_known(built: dict[str, Any]) -> None:
    proc = run_qbuild("run", str(MANIFEST), *FAST, "--prompt", PROMPTS[0], "--adapter", "code",
                      "--max-new-tokens", "10", "--json", cache=built["cache"], check=True)
    assert json.loads(proc.stdout.splitlines()[-1])["results"][0]["tokens"] == built["report"]["tokens"]["code"][0]
    with pytest.raises(RunError, match="unknown adapter 'nope'; known: base, math, poetry, code"):
        run(MANIFEST, FAST, prompts=["x"], adapters=["nope"], cache_dir=built["cache"])
    with pytest.raises(RunError, match="2 --adapter names for 3 prompts"):
        run(MANIFEST, FAST, prompts=["x", "y", "z"], adapters=["math", "code"], cache_dir=built["cache"])
    with pytest.raises(RunError, match=r"known: base \(this build has no model.adapters\)"):
        run(ROOT / "manifests" / "tiny-llama-kv.yaml", FAST, prompts=["x"], adapters=["math"],
            cache_dir=built["cache"])
    with pytest.raises(RunError, match="--adapter: this manifest serves no LoRA adapters"):  # before any build
        run(ROOT / "manifests" / "tiny-gemma3-vlm.yaml", prompts=["x"], adapters=["math"], cache_dir=built["cache"])


# --- keys ---------------------------------------------------------------------------------------------


def keys(data: dict[str, Any], store: Store) -> dict[str, str]:
    resolved, _ = resolve_stages(to_manifest(data), store)
    return {r.stage.name: r.key for r in resolved}


def with_adapters(entries: list[dict[str, Any]], **lora: Any) -> dict[str, Any]:
    return {**KV, "model": {**kp.LLAMA, "adapters": entries, **({"lora": lora} if lora else {})}}


def test_no_adapters_changes_no_key_and_random_adapters_key_their_seed_and_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache", readonly=True)
    plain = keys(KV, store)
    assert keys(with_adapters([]), store) == plain
    assert keys(with_adapters([], r=4, alpha=3.0, target_modules=["o_proj"]), store) == plain  # unused: no key
    two = [{"name": "a", "seed": 1}, {"name": "b", "seed": 2}]
    k = keys(with_adapters(two), store)
    assert list(k) == ["load", "adapters", "export", "compile", "verify"] and k["load"] == plain["load"]
    assert k["export"] != plain["export"]
    seed = keys(with_adapters([two[0], {"name": "b", "seed": 3}]), store)
    order = keys(with_adapters(two[::-1]), store)
    for other in (seed, order):
        assert other["load"] == k["load"] and other["adapters"] != k["adapters"] and other["export"] != k["export"]


def test_an_adapter_directory_is_keyed_by_its_bytes_not_its_place(built: dict[str, Any], tmp_path: Path) -> None:
    store = Store(tmp_path / "cache", readonly=True)
    dirs = {}
    for name in ("math", "code"):
        dirs[name] = tmp_path / name
        shutil.copytree(built["adapters"] / name, dirs[name])
    entries = [{"name": n, "path": str(d)} for n, d in dirs.items()]
    before = keys(with_adapters(entries), store)
    moved = tmp_path / "elsewhere"
    shutil.copytree(dirs["math"], moved)
    assert keys(with_adapters([{"name": "math", "path": str(moved)}, entries[1]]), store) == before
    weights = dirs["code"] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    after = keys(with_adapters(entries), store)
    assert after["load"] == before["load"]
    assert all(after[s] != before[s] for s in ("adapters", "export", "compile", "verify"))


# --- errors -------------------------------------------------------------------------------------------


def _adapter_copy(built: dict[str, Any], tmp_path: Path, name: str, **config: Any) -> Path:
    d = tmp_path / f"{name}-edited"
    shutil.copytree(built["adapters"] / name, d)
    path = d / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return d


@pytest.mark.parametrize(("entries", "expected"), [
    ([{"name": "base", "seed": 1}], r"model.adapters\[0\].name: 'base' is the base model's name"),
    ([{"name": "a", "seed": 1}, {"name": "a", "seed": 2}], r"model.adapters\[1\]: the name 'a' is given twice"),
    ([{"name": "a", "seed": 1, "path": "x"}], r"model.adapters\[0\] \(a\): give exactly one of path and seed"),
    ([{"name": "a", "sed": 1}], r"unknown keys \['sed'\]"),
    (["a"], r"model.adapters\[0\]: expected mapping, got str 'a'"),
])
def test_a_bad_adapter_entry_names_the_key(tmp_path: Path, entries: list[Any], expected: str) -> None:
    with pytest.raises(ManifestError, match=expected) as info:
        to_manifest(with_adapters(entries))
    assert info.value.key == "model.adapters"


def test_adapters_need_the_kv_task_and_the_legacy_exporter() -> None:
    with pytest.raises(ManifestError, match="add transforms=kv_cache"):
        to_manifest({"model": {**kp.LLAMA, "adapters": [{"name": "a", "seed": 1}]}})
    with pytest.raises(ManifestError, match="set export.exporter=legacy"):
        to_manifest({**with_adapters([{"name": "a", "seed": 1}]), "export": {"exporter": "dynamo", "opset": 18}})


def test_directory_errors_name_the_adapter_and_the_file(built: dict[str, Any], tmp_path: Path) -> None:
    store = Store(tmp_path / "cache", readonly=True)
    good = {"name": "math", "path": str(built["adapters"] / "math")}
    cases = [
        ({"path": str(tmp_path / "missing")}, rf"model.adapters\[1\] \(x\): {tmp_path / 'missing'} does not exist"),
        ({"path": str(_adapter_copy(built, tmp_path, "code", peft_type="PREFIX_TUNING"))},
         r"adapter_config.json: not a LoRA adapter \(peft_type 'PREFIX_TUNING'\)"),
        ({"path": str(_adapter_copy(built, tmp_path, "poetry", r=4))},
         r"model.adapters\[1\] \(x\): r 4 \(.*poetry-edited/adapter_config.json\) differs from r 8 of "
         r"model.adapters\[0\] \(math\)"),
        ({"seed": 1}, r"model.adapters\[1\] \(x\): target_modules \['q_proj'\] \(model.lora\) differs from "
                      r"target_modules \['k_proj', 'o_proj', 'q_proj', 'v_proj'\]"),
    ]
    for extra, expected in cases:
        data = with_adapters([good, {"name": "x", **extra}], target_modules=["q_proj"])
        with pytest.raises(PlanError, match=expected):
            keys(data, store)


def test_an_adapter_of_another_base_model_fails_naming_its_file(built: dict[str, Any], tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbuild.tasks.kv_lora import write_random_adapter

    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512))
    write_random_adapter(other, tmp_path / "other", r=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                         seed=0)
    with pytest.raises(LoadError, match=r"model.adapters\[0\] \(other\): .*other: base_model.model.model.layers.0.self_"
                                        r"attn.(q|k|v|o)_proj.lora_A.weight has shape \[8, 32\], the base model's"):
        build(MANIFEST, [*FAST, f"model.adapters=[{{name: other, path: '{tmp_path / 'other'}'}}]"],
              cache_dir=built["cache"])


# --- qaic ---------------------------------------------------------------------------------------------


def test_the_qaic_build_hands_the_compiler_lora_ids(built: dict[str, Any], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    sdk = tmp_path / "qti-aic"
    shutil.copytree(ROOT / "tests" / "fixtures" / "fake-sdk", sdk)
    monkeypatch.setenv("FAKE_QAIC_LOG", str(tmp_path / "calls.jsonl"))
    r = build(MANIFEST, [*FAST, "compile.backend=qaic", f"compile.qaic.sdk_dir={sdk}"], cache_dir=built["cache"])
    assert "report" not in r.artifacts  # no card here: verify is skipped
    out = Path(r.artifacts["compiled"])
    argv = json.loads((out / "command.json").read_text())["argv"]
    assert "-retained-state" in argv and "-network-specialization-config=<out>/specializations.json" in argv
    specs = json.loads((out / "specializations.json").read_text())["specializations"]
    assert [s["symbols"] for s in specs] == [{"batch_size": "1", "ctx_len": "64", "seq_len": n} for n in ("16", "1")]
    custom = (out / "custom_io.yaml").read_text()
    assert "past_key.0" in custom and "lora_ids" not in custom  # int64 ids keep their type, as QEfficient
    graph = onnx.load(r.artifacts["onnx"], load_external_data=False).graph
    lora = next(i for i in graph.input if i.name == "lora_ids")
    dims = [d.dim_param or d.dim_value for d in lora.type.tensor_type.shape.dim]
    assert lora.type.tensor_type.elem_type == onnx.TensorProto.INT64 and dims == ["batch_size", 1]
    ops = {n.op_type for n in graph.node}
    assert {"CtxScatter", "CtxGather", "Gather"} <= ops  # the qaic graph form, adapters by a plain Gather
    assert len([n for n in graph.node if n.op_type == "Gather" and "lora" in "".join(n.input)]) == 3 * 4 * 2
    assert json.loads((Path(r.artifacts["onnx"]).parent / "adapters.json").read_text())["adapters"][0]["name"] == "math"



def test_the_qefficient_style_compiled_model_takes_a_prompt_to_adapter_mapping(built: dict[str, Any]) -> None:
    from qbuild.manifest import compose
    from qbuild.qeff.runnable import CompiledModel

    model = CompiledModel.from_build(compose(MANIFEST, FAST), built["result"])
    got = model.generate(prompts=[PROMPTS[0], PROMPTS[0]], generation_len=10,
                         prompt_to_adapter_mapping=["poetry", "base"])
    assert got.generated_ids == [built["report"]["tokens"]["poetry"][0], built["report"]["tokens"]["base"][0]]
    with pytest.raises(RunError, match="unknown adapter 'nope'"):
        model.generate(prompts=[PROMPTS[0]], prompt_to_adapter_mapping=["nope"])

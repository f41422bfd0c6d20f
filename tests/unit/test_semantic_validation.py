"""Plan-time semantic validation (issue 11): values that used to fail seconds into a build (or with the
wrong error class) are ManifestErrors at compose time that name the key, the value and what is valid,
without importing transformers or torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qbuild.errors import ManifestError
from qbuild.manifest import compose
from qbuild.manifest import model_facts as facts
from qbuild.manifest.validate import check_group_options

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
LLAMA, BERT, MINILM = MANIFESTS / "tiny-llama.yaml", MANIFESTS / "tiny-bert.yaml", MANIFESTS / "minilm.yaml"
ROBERTA, GEMMA3, GPT2 = MANIFESTS / "tiny-roberta.yaml", MANIFESTS / "tiny-gemma3.yaml", MANIFESTS / "tiny-gpt2.yaml"

BAD = [
    # model.config sizes (init: random): integers >= 1, head counts that divide
    (LLAMA, ["model.config.num_hidden_layers=0"], "model.config.num_hidden_layers", ["0", "integer >= 1"]),
    (LLAMA, ["model.config.vocab_size=0"], "model.config.vocab_size", ["0", "integer >= 1"]),
    (LLAMA, ["model.config.hidden_size=-64"], "model.config.hidden_size", ["-64", "integer >= 1"]),
    (LLAMA, ["model.config.intermediate_size=1.5"], "model.config.intermediate_size", ["1.5", "integer >= 1"]),
    (LLAMA, ["model.config.num_attention_heads=3"], "model.config.num_attention_heads",
     ["3 does not divide", "hidden_size=64", "2 or 4"]),
    (LLAMA, ["model.config.num_key_value_heads=3"], "model.config.num_key_value_heads",
     ["3 does not divide", "num_attention_heads=4", "2 or 4"]),
    (LLAMA, ["model.config.num_key_value_heads=8"], "model.config.num_key_value_heads",
     ["8 does not divide", "num_attention_heads=4", "valid near 8: 4"]),
    (GPT2, ["model.config.n_head=3"], "model.config.n_head", ["3 does not divide", "n_embd=64"]),  # an alias
    (GEMMA3, ["model.config.num_hidden_layers=2"], "model.config.layer_types", ["3 layers", "num_hidden_layers=2"]),
    (LLAMA, ["+model.config.rope_theta=inf"], "model.config.rope_theta", ["inf", "finite"]),
    # sizes and seeds within what the libraries accept
    (LLAMA, ["seq.batch_size=4294967296"], "seq.batch_size", ["4294967296", "between 1 and 4096"]),
    (LLAMA, ["verify.batch_size=4294967296"], "verify.batch_size", ["4294967296", "between 1 and 4096"]),
    (LLAMA, [f"model.seed={2**64}"], "model.seed", [str(2**64), str(2**64 - 1), "torch.manual_seed"]),
    (LLAMA, [f"model.seed={2**70}"], "model.seed", [str(2**70), str(2**64 - 1)]),
    (LLAMA, [f"verify.seed={2**32}"], "verify.seed", [str(2**32), str(2**32 - 1), "RandomState"]),
    (BERT, [f"verify.seed={2**32 - 1}"], "verify.seed", [str(2**32 - 1), "longest bucket 128", f"<= {2**32 - 129}"]),
    # the architecture is a model type transformers or qbuild knows
    (LLAMA, ["model.architecture=notamodel"], "model.architecture", ["'notamodel'", "transformers model_type",
                                                                     "grok-1"]),
    (LLAMA, ["model.architecture=lama"], "model.architecture", ["'lama'", "did you mean 'llama'"]),
    (LLAMA, ["model.architecture=grok1"], "model.architecture", ["'grok1'", "did you mean 'grok-1'"]),
    (LLAMA, ["model.architecture=LlamaForCausalLM"], "model.architecture",
     ["'LlamaForCausalLM'", "did you mean 'llama'"]),
    # kv_cache needs a causal LM of a family it rewrites
    (LLAMA, ["model=minilm", "transforms=kv_cache"], "transforms.apply", ["kv_cache", "embedding", "causal_lm"]),
    (BERT, ["transforms=kv_cache"], "transforms.apply", ["kv_cache", "embedding (bert)", "causal_lm"]),
    (BERT, ["transforms=kv_cache", "model.task=causal_lm", "pooling=none"], "transforms.apply",
     ["no rewrite for model type 'bert'", "llama"]),
    (LLAMA, ["transforms.apply=[kv_cache,none]"], "transforms.apply", ["'none'", "not a transform", "kv_cache"]),
    (LLAMA, ["transforms.apply=[kv_cache,kv_cache]"], "transforms.apply", ["kv_cache is listed twice"]),
    # the exporter and its opsets
    (LLAMA, ["export.exporter=dynamo", "export.opset=14"], "export.opset", ["14", "dynamo", "between 18 and 23"]),
    # buckets <= seq.ctx_len <= the model's max positions
    (LLAMA, ["model.config.max_position_embeddings=16"], "seq.ctx_len",
     ["128", "model.config.max_position_embeddings=16", "<= 16"]),
    (GPT2, ["seq.ctx_len=512", "model.config.n_positions=256"], "seq.ctx_len", ["512", "n_positions=256", "<= 256"]),
    (BERT, ["seq.lengths=[512]", "seq.ctx_len=512"], "seq.lengths",
     ["512", "model.config.max_position_embeddings=256", "<= 256"]),
    (ROBERTA, ["seq.lengths=[256]", "seq.ctx_len=256"], "seq.lengths", ["256 + 2", "<= 254"]),
    (MINILM, ["seq.lengths=[1024]", "seq.ctx_len=1024"], "seq.lengths",
     ["1024", "max_position_embeddings=512 in", "config.json", "<= 512"]),  # a checkpoint's config.json
    # a checkpoint's config.json is used as is: keys that shape random weights would be dropped
    (MINILM, ["+model.config.hidden_size=8"], "model.config", ["model.init=random", "config.json"]),
    (MINILM, ["+model.architecture=bert"], "model.architecture", ["model.init=random", "config.json"]),
    # floats are finite: JSON keys cannot hold inf or nan
    (LLAMA, ["verify.atol=inf"], "verify.atol", ["inf", "finite number >= 0"]),
    (LLAMA, ["verify.atol=1e999"], "verify.atol", ["inf", "finite number >= 0"]),
    (LLAMA, ["verify.atol=nan"], "verify.atol", ["nan", "finite number >= 0"]),
    (LLAMA, ["verify.atol=-inf"], "verify.atol", ["-inf", "finite number >= 0"]),
]


@pytest.mark.parametrize(("manifest", "overrides", "key", "fragments"), BAD,
                         ids=[" ".join(case[1])[:60] for case in BAD])
def test_semantic_error(manifest: Path, overrides: list[str], key: str, fragments: list[str]) -> None:
    with pytest.raises(ManifestError) as info:
        compose(manifest, overrides)
    err = info.value
    assert err.key == key, str(err)
    for fragment in fragments:
        assert fragment in str(err), str(err)
    assert str(err).startswith(key.split("[")[0]) and len(str(err)) < 500


GOOD = [
    (LLAMA, ["model.config.num_attention_heads=4"]),
    (LLAMA, ["model.config.num_attention_heads=8", "model.config.num_key_value_heads=8"]),
    (LLAMA, ["model.config.num_key_value_heads=1"]),
    (LLAMA, ["model.config.num_key_value_heads=4"]),
    (LLAMA, ["model.config.max_position_embeddings=128"]),  # ctx_len == max positions
    (LLAMA, ["~model.config.max_position_embeddings", "seq.ctx_len=100000"]),  # the default is not known here
    (LLAMA, ["~model.config.hidden_size", "model.config.num_attention_heads=6"]),  # no hidden size to relate 6 to
    (LLAMA, [f"model.seed={2**64 - 1}", f"verify.seed={2**32 - 1}", "seq.batch_size=4096", "verify.atol=0"]),
    (LLAMA, ["export.exporter=dynamo", "export.opset=18"]),
    (LLAMA, ["+model.config.rope_scaling={rope_type: llama3, factor: 8.0}"]),
    (LLAMA, ["transforms=kv_cache"]),
    (LLAMA, ["transforms=kv_cache_rmsnorm"]),
    (MANIFESTS / "tiny-qwen3.yaml", ["model.config.num_attention_heads=6"]),  # head_dim given: 64 % 6 is fine
    (MANIFESTS / "tiny-grok1.yaml", ["transforms=kv_cache"]),  # qbuild's own model type
    (ROBERTA, ["seq.lengths=[254]", "seq.ctx_len=254"]),
    (BERT, [f"verify.seed={2**32 - 129}"]),
    (MINILM, ["seq.lengths=[512]", "seq.ctx_len=512"]),
    (LLAMA, ["compile=qaic", "compile.onnxruntime.threads=4"]),  # the other backend's settings: kept, unused
]


@pytest.mark.parametrize(("manifest", "overrides"), GOOD, ids=[" ".join(case[1])[:60] or "-" for case in GOOD])
def test_valid_edge_cases_compose(manifest: Path, overrides: list[str]) -> None:
    compose(manifest, overrides)


# --- composing group options together -------------------------------------------------------------


@pytest.mark.parametrize(("paths", "fragments"), [
    (["model/tiny-llama", "transforms/kv_cache", "transforms/none"], ["'none' cannot be combined with kv_cache"]),
    (["transforms/none", "transforms/kv_cache"], ["'none' cannot be combined with kv_cache"]),
    (["transforms/kv_cache_rmsnorm", "transforms/kv_cache"], ["only the last (kv_cache) would apply"]),
])
def test_group_options_that_drop_each_other(paths: list[str], fragments: list[str]) -> None:
    with pytest.raises(ManifestError) as info:
        check_group_options(paths)
    assert info.value.key == "transforms" and "transforms=[" in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_single_group_options_pass() -> None:
    check_group_options(["model/tiny-llama", "transforms/kv_cache", "compile/qaic", "compile/qaic-mxfp6"])


def test_transforms_none_combined_is_an_error_when_composed() -> None:
    with pytest.raises(ManifestError) as info:
        compose(LLAMA, ["transforms=[kv_cache,none]"])
    assert info.value.key == "transforms" and "'none' cannot be combined" in str(info.value)


# --- the facts, read without transformers -------------------------------------------------------------


def test_model_types_without_importing_transformers() -> None:
    code = textwrap.dedent("""\
        import sys
        from qbuild.manifest import model_facts as f
        assert f.is_known_model_type("llama") and f.is_known_model_type("gemma3_text")
        assert f.transformers_model_types.cache_info().currsize == 0  # the fast path parsed nothing
        assert f.is_known_model_type("grok-1") and f.is_known_model_type("notamodel") is False
        assert "grok-1" in f.kv_cache_families() and "bert" not in f.kv_cache_families()
        heavy = sorted(m for m in ("torch", "transformers", "onnx", "onnxruntime") if m in sys.modules)
        assert not heavy, heavy
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_model_types_match_transformers_registry() -> None:
    code = textwrap.dedent("""\
        from qbuild.manifest import model_facts as f
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        ours = f.transformers_model_types()
        assert ours == set(CONFIG_MAPPING_NAMES), sorted(ours ^ set(CONFIG_MAPPING_NAMES))
        assert all(f.is_known_model_type(t) for t in CONFIG_MAPPING_NAMES)
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_suggestions_are_model_types_not_class_names() -> None:
    assert "EvollaModel" in facts.transformers_model_types()  # a key of transformers' own registry
    assert all(t == t.lower() for t in facts.close_model_types("notamodel") + facts.close_model_types("evolla"))


def test_statements_of_both_layouts() -> None:
    text = textwrap.dedent("""\
        X = 1
        CONFIG_MAPPING_NAMES = OrderedDict(
            [
                ("a", "AConfig"),  # (comment)
            ]
        )
        CONFIG_MAPPING_NAMES.update({"b": "BConfig"})
        CONFIG_MAPPING_NAMES_OTHER = {}
        """)
    found = facts._statements(text, "CONFIG_MAPPING_NAMES")
    assert len(found) == 2 and found[0].endswith(")") and '("a", "AConfig")' in found[0]
    assert found[1] == 'CONFIG_MAPPING_NAMES.update({"b": "BConfig"})'

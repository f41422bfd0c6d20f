"""load_tokenizer never offers or runs a checkpoint's remote code (Grok-1's config.json names only ``auto_map``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qbuild.errors import LoadError
from qbuild.models.tokenizer import load_tokenizer, train_bpe
from tests.conftest import ROOT

TEXTS = ["My name is Wolfgang", "The capital of France is Paris.", "héllo wörld 123"]
CUSTOM_CONFIG = {
    "architectures": ["XForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
    "model_type": "x-custom",
}
LOAD = """
import json, sys
from qbuild.models.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
print("IDS " + json.dumps([tok(t)["input_ids"] for t in json.loads(sys.argv[2])]))
"""


@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE saved next to a config.json that names only custom code."""
    directory = tmp_path_factory.mktemp("custom")
    train_bpe(300, directory)
    (directory / "config.json").write_text(json.dumps(CUSTOM_CONFIG))
    return directory


def _direct_ids(directory: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return [list(e.ids) for e in tok.encode_batch(TEXTS)]


def test_a_custom_code_config_loads_without_prompting(custom_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", LOAD, str(custom_dir), json.dumps(TEXTS)], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "custom code" not in proc.stdout and "trust_remote_code" not in proc.stdout + proc.stderr
    ids = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("IDS "))[4:])
    assert ids == _direct_ids(custom_dir)


def test_a_custom_tokenizer_class_with_tokenizer_json_loads_from_the_file(custom_dir: Path, tmp_path: Path) -> None:
    for f in custom_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_x.XTokenizerFast"]})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert [tok(t)["input_ids"] for t in TEXTS] == _direct_ids(custom_dir)
    assert (tok.pad_token, tok.eos_token) == ("<pad>", "</s>")


def test_a_tokenizer_that_needs_custom_code_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CUSTOM_CONFIG))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "XTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}))
    with pytest.raises(LoadError, match=r"needs custom tokenizer code \(tokenization_x.XTokenizer\)") as info:
        load_tokenizer(tmp_path)
    assert "never runs" in str(info.value) and "tokenizer.json" in str(info.value)

"""Hostile manifests and overrides fail fast with a short ManifestError naming the file (issue 11); errors that
Hydra and OmegaConf report without a key name the key.

Each hostile case is bounded in time (``FAST_S``, a generous bound measured with ``time.monotonic``): a proof
that the input is refused before Hydra or OmegaConf expand it, not a benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qbuild.errors import ManifestError
from qbuild.manifest import compose
from qbuild.manifest.limits import MAX_DEPTH, MAX_FILE_BYTES, MAX_MESSAGE, MAX_NODES, MAX_OVERRIDE_CHARS

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "manifests" / "tiny-llama.yaml"
FAST_S = 2.0
HEAD = "defaults:\n  - model: tiny-llama\n  - _self_\n"


def laughs(levels: int = 10, fanout: int = 9) -> str:
    """A "billion laughs": each anchor's list holds ``fanout`` aliases of the previous one (600 bytes)."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * fanout)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *a{levels - 1}\n"


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    """Import Hydra and OmegaConf once, so the timed cases measure the check, not the first import."""
    compose(TINY)


def refused(path: Path, overrides: list[str] | None = None) -> ManifestError:
    """Compose ``path``; it must fail fast with a short ManifestError."""
    t0 = time.monotonic()
    with pytest.raises(ManifestError) as info:
        compose(path, overrides or [])
    seconds = time.monotonic() - t0
    message = str(info.value)
    assert seconds < FAST_S, f"took {seconds:.1f}s: {message[:200]}"
    assert len(message) <= MAX_MESSAGE, message[:600]
    return info.value


def write(tmp_path: Path, text: str | bytes, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- hostile YAML: fails fast, names the file -----------------------------------------------------

HOSTILE_YAML: dict[str, tuple[Callable[[], str], str]] = {
    "billion laughs": (lambda: laughs(), f"more than {MAX_NODES:,} nodes"),
    "billion laughs, mappings": (
        lambda: "a0: &a0 {x: 1, y: 2, z: 3}\n" + "".join(
            f"a{i}: &a{i} {{{', '.join(f'k{j}: *a{i - 1}' for j in range(9))}}}\n" for i in range(1, 10)
        ) + "name: *a9\n",
        "nodes",
    ),
    "self-referencing alias": (lambda: "name: &a [*a]\n", "recursive alias"),
    "self-referencing mapping": (lambda: "model: &m {config: *m}\n", "recursive alias"),
    "undefined alias": (lambda: "name: *nope\n", "refers to no anchor"),
    "200-level list": (lambda: "name: " + "[" * 200 + "]" * 200 + "\n", f"at most {MAX_DEPTH} deep"),
    "200-level mapping": (lambda: "name: " + "{a: " * 200 + "1" + "}" * 200 + "\n", f"at most {MAX_DEPTH} deep"),
    "200-level block mapping": (lambda: "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "1\n",
                                "deep"),
    "alias deeper than the limit": (
        lambda: "a: &a " + "[" * 20 + "]" * 20 + "\nb: " + "[" * 20 + "*a" + "]" * 20 + "\n", "deep"),
    "20 MB name": (lambda: HEAD + "name: " + "x" * 20_000_000 + "\n", f"at most {MAX_FILE_BYTES:,} bytes"),
    "100k unknown keys": (lambda: HEAD + "".join(f"k{i}: 1\n" for i in range(100_000)), "nodes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_hostile_yaml_fails_fast_naming_the_file(tmp_path: Path, case: str) -> None:
    make, expected = HOSTILE_YAML[case]
    path = write(tmp_path, make())
    err = refused(path)
    assert str(path) in str(err) and expected in str(err), str(err)


@pytest.mark.parametrize("suffix", [".yml", ".toml"])
def test_the_limits_hold_for_yml_and_toml(tmp_path: Path, suffix: str) -> None:
    if suffix == ".yml":
        cases = [laughs(), "name: " + "[" * 200 + "]" * 200 + "\n"]
    else:
        cases = ["name = " + "[" * 200 + "]" * 200 + "\n", "a = " + "[" * 5000 + "]" * 5000 + "\n",
                 f"[{'.'.join(['t'] * 40)}]\nx = 1\n", "".join(f"k{i} = 1\n" for i in range(60_000))]
    cases.append("name = '" + "x" * (MAX_FILE_BYTES + 1) + "'\n")
    for i, text in enumerate(cases):
        path = write(tmp_path, text, f"m{i}{suffix}")
        err = refused(path)
        assert str(path) in str(err), str(err)


def test_group_files_the_manifest_selects_are_checked_first(tmp_path: Path) -> None:
    evil = write(tmp_path, laughs(), "model/evil.yaml")
    deep = write(tmp_path, "defaults:\n  - /seq: deep\n  - _self_\n", "model/chain.yaml")
    write(tmp_path, "lengths: " + "[" * 100 + "]" * 100 + "\n", "seq/deep.yaml")
    by_defaults = write(tmp_path, "defaults:\n  - model: evil\n  - _self_\n", "a.yaml")
    assert str(evil) in str(refused(by_defaults))
    by_override = write(tmp_path, HEAD, "b.yaml")
    assert str(evil) in str(refused(by_override, ["model=evil"]))
    through_a_group_file = write(tmp_path, "defaults:\n  - model: chain\n  - _self_\n", "c.yaml")
    assert str(deep.parent.parent / "seq" / "deep.yaml") in str(refused(through_a_group_file))
    write(tmp_path, laughs(), "unrelated/junk.yaml")  # not selected: not read, not refused
    ok = write(tmp_path, HEAD, "d.yaml")
    assert compose(ok).manifest.model.architecture == "llama"


@pytest.mark.parametrize("override,expected", [
    ("name=" + "x" * (MAX_OVERRIDE_CHARS + 1), f"at most {MAX_OVERRIDE_CHARS:,}"),
    ("+x=[" + ",".join(["1"] * 20_000) + "]", f"at most {MAX_OVERRIDE_CHARS:,}"),
    ("+x=" + "[" * 200 + "]" * 200, f"at most {MAX_DEPTH} deep"),
    ("+x=" + "{a:" * 40 + "1" + "}" * 40, f"at most {MAX_DEPTH} deep"),
    ("+" + ".".join(["k"] * 40) + "=1", f"at most {MAX_DEPTH} deep"),
])
def test_hostile_overrides_fail_fast_naming_the_override(override: str, expected: str) -> None:
    err = refused(TINY, [override])
    assert "override '" + override[:20] in str(err) and expected in str(err), str(err)


def test_a_huge_value_is_quoted_short(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "seq:\n  ctx_len: " + "x" * 900_000 + "\n")
    err = refused(path)
    assert str(err).startswith("seq.ctx_len: expected int") and "characters cut" in str(err)


# --- errors that used to name no key -------------------------------------------------------------

SEQ_HEAD = "defaults:\n  - model: tiny-llama\n  - seq: default\n  - _self_\n"


@pytest.mark.parametrize("body,key,words", [
    (SEQ_HEAD + "seq: {lengths: {a: 1}}\n", "seq.lengths", ["expected a list"]),
    (SEQ_HEAD + "model: {config: [1, 2]}\n", "model.config", ["expected a mapping"]),
    (SEQ_HEAD + "seq: [1, 2]\n", "seq", ["expected a mapping"]),
    (HEAD + "name: ${\n", "name", ["interpolation"]),
    (HEAD + "name: x${oops\n", "name", ["interpolation"]),
    ("defaults:\n  - model: tiny-llama\n  - ../../etc\n  - _self_\n", "defaults", ["'../../etc'"]),
    ("defaults:\n  - model: tiny-llama\n  - no_such_config\n  - _self_\n", "defaults", ["'no_such_config'"]),
])
def test_manifest_errors_name_the_key(tmp_path: Path, body: str, key: str, words: list[str]) -> None:
    err = refused(write(tmp_path, body))
    assert err.key == key and str(err).startswith(f"{key}:"), (err.key, str(err))
    for word in words:
        assert word in str(err), str(err)


@pytest.mark.parametrize("override,key,words", [
    ("seq=5", "seq", ["config group", "buckets, default"]),
    ("seq=[1,2]", "seq", ["config group"]),
    ("model.config=[1,2]", "model.config", ["expected a mapping", "override 'model.config=[1,2]'"]),
    ("seq.lengths={a:1}", "seq.lengths", ["expected a list"]),
])
def test_override_errors_name_the_key(override: str, key: str, words: list[str]) -> None:
    err = refused(TINY, [override])
    assert err.key == key and key in str(err), (err.key, str(err))
    for word in words:
        assert word in str(err), str(err)


def test_a_sweep_without_m_says_to_use_m() -> None:
    err = refused(TINY, ["compile.qaic.num_cores=1,2"])
    text = str(err)
    assert err.key == "compile.qaic.num_cores" and "-m compile.qaic.num_cores=1,2" in text, text
    assert "[a,b]" not in text  # num_cores is an int: a list is no answer
    lists = refused(TINY, ["seq.lengths=8,16"])
    assert "-m seq.lengths=8,16" in str(lists) and "seq.lengths=[a,b]" in str(lists)

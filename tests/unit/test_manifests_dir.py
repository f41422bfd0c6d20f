"""Every manifest shipped under manifests/ composes and validates (a broken example fails CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbuild.manifest import compose

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted(p for p in (ROOT / "manifests").iterdir() if p.suffix in (".yaml", ".toml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_composes(path: Path) -> None:
    composed = compose(path)
    assert composed.name
    assert composed.manifest.model.task in ("causal_lm", "embedding", "image-text-to-text")


def test_every_yaml_has_a_toml_twin_with_the_same_config() -> None:
    for y in (p for p in MANIFESTS if p.suffix == ".yaml"):
        t = y.with_suffix(".toml")
        if t.exists():
            assert compose(y).config == compose(t).config

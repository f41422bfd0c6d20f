"""The manifest layer: compose YAML / TOML manifests with Hydra and validate them against the schema."""

from __future__ import annotations

from qbuild.manifest.compose import ComposedManifest, compose, to_yaml
from qbuild.manifest.schema import Manifest
from qbuild.manifest.validate import to_manifest

__all__ = ["ComposedManifest", "Manifest", "compose", "to_manifest", "to_yaml"]

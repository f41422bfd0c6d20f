"""Hydra SearchPathPlugin: puts qbuild's shipped config groups (``pkg://qbuild.conf``) on every search path.

Hydra discovers it through the ``hydra_plugins`` namespace package, so it serves both the compose API
(``qbuild.manifest.compose``) and ``@hydra.main`` apps (sweeps). Appended, so groups next to a
manifest win over shipped groups of the same name.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "qbuild"
SEARCH_PATH = "pkg://qbuild.conf"


class QBuildSearchPathPlugin(SearchPathPlugin):
    """Appends ``pkg://qbuild.conf`` to Hydra's config search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider=PROVIDER, path=SEARCH_PATH)

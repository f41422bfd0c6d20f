"""A loaded transformers model, saved by content so that a manifest can name it and its weights key the build.

``save_model`` writes ``save_pretrained`` output into a staging directory of ``<cache>/api/models``, names it
by the sha256 of its files (names and digests) and publishes it by an atomic rename: the same weights
always land in the same directory, and a directory there is never half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def save_model(model: Any, cache: Path) -> Path:
    """The content-addressed directory holding ``model`` as ``save_pretrained`` writes it (the weights of a
    model rewritten by ``transform_lm`` are saved as those of its original class)."""
    root = Path(cache) / "api" / "models"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        with _original_class(model):
            model.save_pretrained(staging)
        final = root / _digest(staging)
        if (final / "config.json").is_file():
            return final
        try:
            os.rename(staging, final)
        except OSError:  # another process published the same content first
            if not (final / "config.json").is_file():
                raise
        return final
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        file_hash = hashlib.sha256()
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                file_hash.update(block)
        h.update(f"{f.relative_to(directory).as_posix()}\0{file_hash.hexdigest()}\n".encode())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _original_class(model: Any) -> Any:
    """Present a ``kv_cache``-rewritten model as its original class while it is saved (config.json's
    ``architectures`` names the class)."""
    from qbuild.transforms.kv_cache import KVCausalLM

    cls = type(model)
    if not isinstance(model, KVCausalLM):
        yield
        return
    original = next(c for c in cls.__mro__[1:] if not issubclass(c, KVCausalLM))
    model.__class__ = original
    try:
        yield
    finally:
        model.__class__ = cls

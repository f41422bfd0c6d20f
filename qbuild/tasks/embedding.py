"""Embedding (encoder) models: pooled ``[batch_size, hidden]`` from ``input_ids`` + ``attention_mask``.

Export bakes the pooling (and L2 normalisation) into the graph; it does not depend on the buckets.
Compile gets one specialisation per ``seq.lengths`` bucket. Verify compares the compiled artifact, run
on padded inputs in every bucket (and on texts through the runtime when a tokenizer is at hand), with
PyTorch on each row unpadded, with the same pooling.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import VerifyError
from qbuild.manifest.schema import Manifest
from qbuild.tasks import Task

if TYPE_CHECKING:
    import numpy as np

    from qbuild.stages.base import StageContext

#: verify texts of several lengths (the longest exceeds 128 tokens and is truncated to the largest bucket)
VERIFY_TEXTS = (
    "Hello!",
    "The quick brown fox jumps over the lazy dog while the cat watches from the window sill.",
    "Sentence embeddings map a text to one vector, so that texts with similar meanings end up close "
    "together; they power semantic search, clustering, deduplication and retrieval for language models. "
    "Padding to a bucket must not change them.",
    " ".join(f"word{i} and then some more words number {i}" for i in range(30)),
)


def _model_dir(model: Any) -> Path | None:
    """The directory a transformers model was loaded from (its sentence-transformers metadata lives there)."""
    name = getattr(model, "name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def _max_diff(ref: np.ndarray, got: np.ndarray) -> float:
    import numpy as np

    if ref.shape != got.shape:
        return float("inf")
    d = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    return float(np.nanmax(np.where(np.isnan(d), np.inf, d))) if d.size else 0.0


class EmbeddingTask(Task):
    name = "embedding"
    default_atol = 1e-5

    def export_params(self, m: Manifest) -> dict[str, Any]:
        from qbuild.pooling import source_digest

        p: dict[str, Any] = {"pooling.method": m.pooling.method, "pooling.normalize": m.pooling.normalize}
        digest = source_digest(m.pooling.method)
        if digest:
            p["pooling.function_sha256"] = digest  # editing the user function re-exports
        return p

    def export(self, model: Any, out: Path, m: Manifest) -> dict[str, Any]:
        from qbuild.exporters.embedding import export_embedding
        from qbuild.pooling import resolve_pooling

        pooling = resolve_pooling(m.pooling.method, m.pooling.normalize, _model_dir(model))
        return export_embedding(model, out, pooling, exporter=m.export.exporter, opset=m.export.opset)

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        lengths = sorted(set(m.seq.lengths))
        names = ["Embedding"] if len(lengths) == 1 else [f"Embedding_{i}" for i in range(len(lengths))]
        return [{"name": n, "symbols": {"batch_size": m.seq.batch_size, "seq_len": L}}
                for n, L in zip(names, lengths, strict=True)]

    def sample_inputs(self, m: Manifest, symbols: dict[str, int]) -> dict[str, Any] | None:
        import numpy as np

        b, s = int(symbols["batch_size"]), int(symbols["seq_len"])
        vocab = int(m.model.config.get("vocab_size", 1000))  # any id below the vocabulary size will do
        rng = np.random.RandomState(0)
        return {"input_ids": rng.randint(0, min(vocab, 1000), size=(b, s)).astype(np.int64),
                "attention_mask": np.ones((b, s), dtype=np.int64)}

    def verify_params(self, m: Manifest) -> dict[str, Any]:
        return {**super().verify_params(m), "verify.texts": list(m.verify.texts)}

    def verify(self, ctx: StageContext, compiled: Path) -> dict[str, Any]:
        from qbuild.pooling import Pooling, pooled_module
        from qbuild.runtime.embed import artifact_sessions

        m, meta = ctx.manifest, ctx.inputs["export"].meta
        p = meta["pooling"]
        pooling = Pooling(p["method"], p["normalize"], p["origin"])
        reference = pooled_module(ctx.model(), pooling)
        sessions = artifact_sessions(compiled)
        ctx.progress("comparing ONNX Runtime with PyTorch in every bucket", None)
        rows = [self._check_bucket(reference, sessions, spec, m.verify.seed, meta["vocab_size"])
                for spec in sessions.specializations]
        ctx.progress("comparing embeddings of texts", None)
        texts = self._check_texts(ctx, reference, compiled, meta)
        report = {"atol": self.atol(m), "pooling": pooling.as_dict(), "session": sessions.mode,
                  "buckets": rows, "texts": texts,
                  "max_abs_diff": max([r["max_abs_diff"] for r in rows] + [texts.get("max_abs_diff", 0.0)])}
        if not report["max_abs_diff"] <= report["atol"]:
            worst = max(rows + [texts], key=lambda r: r.get("max_abs_diff", 0.0))
            raise VerifyError(f"embeddings differ from PyTorch ({pooling.method} pooling): max abs diff "
                              f"{report['max_abs_diff']:.3g} > atol {report['atol']:g} in {worst.get('name')}",
                              hint="if the difference is expected (e.g. float16), raise verify.atol")
        return report

    @staticmethod
    def _reference(reference: Any, ids: list[list[int]]) -> list[np.ndarray]:
        """PyTorch, one unpadded row at a time."""
        import torch

        out = []
        with torch.no_grad():
            for x in ids:
                t = torch.tensor([x], dtype=torch.int64)
                out.append(reference(t, torch.ones_like(t))[0].numpy())
        return out

    def _check_bucket(self, reference: Any, sessions: Any, spec: dict[str, Any], seed: int,
                      vocab: int) -> dict[str, Any]:
        """Random ids padded to ``[batch_size, seq_len]``; row 0 is longer than the next smaller bucket."""
        import numpy as np

        b, s = spec["symbols"]["batch_size"], spec["symbols"]["seq_len"]
        smaller = [x["symbols"]["seq_len"] for x in sessions.specializations if x["symbols"]["seq_len"] < s]
        rng = np.random.RandomState(seed + s)
        lengths = [int(rng.randint(max(smaller, default=0) + 1, s + 1))] + [int(rng.randint(1, s + 1))
                                                                            for _ in range(b - 1)]
        ids = [rng.randint(0, vocab, size=n).tolist() for n in lengths]
        input_ids, mask = np.zeros((b, s), dtype=np.int64), np.zeros((b, s), dtype=np.int64)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)], mask[r, : len(x)] = x, 1
        got = sessions.session_for(spec["symbols"]).run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        ref = self._reference(reference, ids)
        diff = max(_max_diff(r, g if g.ndim == 1 else g[: len(x)]) for r, g, x in zip(ref, got, ids, strict=True))
        return {"name": spec["name"], "symbols": spec["symbols"], "lengths": lengths, "max_abs_diff": diff}

    def _check_texts(self, ctx: StageContext, reference: Any, compiled: Path, meta: dict[str, Any]) -> dict:
        """The runtime path (tokenizer, batching, bucket choice, padding) on texts of several lengths."""
        from qbuild.runtime.embed import Embedder, has_tokenizer

        m = ctx.manifest
        directory = ctx.tokenizer_dir()
        if not has_tokenizer(directory):
            return {"name": "texts", "skipped": f"no tokenizer in {directory}"}
        embedder = Embedder(compiled, directory, overflow="truncate", vocab_size=meta["vocab_size"])
        texts = list(m.verify.texts) or list(VERIFY_TEXTS)
        ids = embedder.tokenize(texts)
        got, ref = embedder.run(ids), self._reference(reference, ids)
        diff = max(_max_diff(r, g) for r, g in zip(ref, got, strict=True))
        return {"name": "texts", "count": len(texts), "tokens": [len(x) for x in ids], "max_abs_diff": diff}

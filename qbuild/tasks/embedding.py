"""Embedding (encoder) models: pooled ``[batch_size, hidden]`` from ``input_ids`` + ``attention_mask``.

Export bakes the pooling (and L2 normalisation) into the graph; it does not depend on the buckets.
Dynamic dims are named ``batch_size`` and ``seq_len``: the specialisations' symbol names. The pooled
output is ``sentence_embedding``; with ``pooling: none`` it is ``token_embeddings`` ``[batch_size,
seq_len, hidden]`` (an output named ``embedding`` would collide with an internal value under dynamo).
Compile gets one specialisation per ``seq.lengths`` bucket. Verify compares the compiled artifact, run
on padded inputs in every bucket (and on texts through the runtime when a tokenizer is at hand), with
PyTorch on each row unpadded, with the same pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import ExportError, ManifestError, VerifyError, one_line
from qbuild.manifest.schema import Manifest
from qbuild.tasks import Task
from qbuild.tasks.export_common import (
    DATA_FILE,
    MODEL_FILE,
    check_args,
    example_inputs,
    gather_external_data,
    legacy_export,
    output_files,
    quiet,
)
from qbuild.transforms.pooling import Pooling, pooled_module

if TYPE_CHECKING:
    import numpy as np
    import torch

    from qbuild.runtime import Artifact
    from qbuild.stages.base import StageContext
    from qbuild.stages.export import ExportParams
    from qbuild.stages.verify import VerifyParams


@dataclass(frozen=True)
class PoolingOptions:
    method: str
    normalize: bool | None
    function_sha256: str | None = None  # a user function's source: editing it re-exports


@dataclass(frozen=True)
class EmbeddingVerify:
    atol: float
    seed: int
    texts: tuple[str, ...]


#: verify texts of several lengths (the longest exceeds 128 tokens and is truncated to the largest bucket)
VERIFY_TEXTS = (
    "Hello!",
    "The quick brown fox jumps over the lazy dog while the cat watches from the window sill.",
    "Sentence embeddings map a text to one vector, so that texts with similar meanings end up close "
    "together; they power semantic search, clustering, deduplication and retrieval for language models. "
    "Padding to a bucket must not change them.",
    " ".join(f"word{i} and then some more words number {i}" for i in range(30)),
)


def _max_diff(ref: np.ndarray, got: np.ndarray) -> float:
    import numpy as np

    if ref.shape != got.shape:
        return float("inf")
    d = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    return float(np.nanmax(np.where(np.isnan(d), np.inf, d))) if d.size else 0.0


class EmbeddingTask(Task):
    name = "embedding"
    code = ("tasks/__init__.py", "tasks/embedding.py", "tasks/export_common.py")
    default_atol = 1e-5

    def export_options(self, m: Manifest) -> PoolingOptions:
        from qbuild.transforms.pooling import source_digest

        return PoolingOptions(m.pooling.method, m.pooling.normalize, source_digest(m.pooling.method))

    def export(self, model: Any, out: Path, p: ExportParams, ctx: StageContext) -> dict[str, Any]:
        from qbuild.transforms.pooling import resolve_pooling

        o: PoolingOptions = p.options
        pooling = resolve_pooling(o.method, o.normalize, ctx.model_dir(p.model))
        return export_embedding(model, out, pooling, exporter=p.exporter, opset=p.opset)

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        lengths = sorted(set(m.seq.lengths))
        names = ["Embedding"] if len(lengths) == 1 else [f"Embedding_{i}" for i in range(len(lengths))]
        return [{"name": n, "symbols": {"batch_size": m.seq.batch_size, "seq_len": L}}
                for n, L in zip(names, lengths, strict=True)]

    def sample_inputs(self, symbols: dict[str, int], vocab_size: int) -> dict[str, Any] | None:
        import numpy as np

        b, s = int(symbols["batch_size"]), int(symbols["seq_len"])
        rng = np.random.RandomState(0)
        return {"input_ids": rng.randint(0, min(vocab_size, 1000), size=(b, s)).astype(np.int64),
                "attention_mask": np.ones((b, s), dtype=np.int64)}

    def calibration_inputs(self, specializations: list[dict[str, Any]], vocab_size: int, *,
                           graph_inputs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """What a quantisation is measured on: per bucket, 16 rows of random lengths (a quarter of the bucket
        to all of it, right-padded) of random ids from the upper part of the vocabulary (seeded)."""
        import numpy as np

        rng = np.random.default_rng(0)
        low = min(1000, vocab_size // 2)
        feeds = []
        for spec in specializations:
            seq = int(spec["symbols"]["seq_len"])
            lengths = rng.integers(max(2, seq // 4), seq + 1, size=16)
            ids = rng.integers(low, vocab_size, size=(16, seq)).astype(np.int64)
            mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
            feeds.append({"input_ids": ids * mask, "attention_mask": mask})
        return feeds

    def verify_options(self, m: Manifest) -> EmbeddingVerify:
        return EmbeddingVerify(self.atol(m), m.verify.seed, tuple(m.verify.texts))

    def verify(self, p: VerifyParams, ctx: StageContext, artifact: Artifact) -> dict[str, Any]:
        from qbuild.transforms.pooling import Pooling, pooled_module

        o: EmbeddingVerify = p.check
        meta = ctx.inputs["export"].meta
        pm = meta["pooling"]
        pooling = Pooling(pm["method"], pm["normalize"], pm["origin"])
        reference = pooled_module(ctx.model(p.model), pooling)
        sessions = artifact.sessions()
        ctx.progress(f"comparing {artifact.backend} with PyTorch in every bucket", None)
        rows = [self._check_bucket(reference, sessions, spec, o.seed, meta["vocab_size"])
                for spec in sessions.specializations]
        ctx.progress("comparing embeddings of texts", None)
        texts = self._check_texts(p, ctx, reference, artifact, meta)
        report = {"atol": o.atol, "pooling": pooling.as_dict(), "session": sessions.mode,
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

    def _check_texts(self, p: VerifyParams, ctx: StageContext, reference: Any, artifact: Artifact,
                     meta: dict[str, Any]) -> dict:
        """The runtime path (tokenizer, batching, bucket choice, padding) on texts of several lengths."""
        from qbuild.runtime.embed import Embedder, has_tokenizer

        directory = ctx.tokenizer_dir(p.tokenizer, p.model)
        if not has_tokenizer(directory):
            return {"name": "texts", "skipped": f"no tokenizer in {directory}"}
        embedder = Embedder(artifact, directory, overflow="truncate", vocab_size=meta["vocab_size"])
        texts = list(p.check.texts) or list(VERIFY_TEXTS)
        ids = embedder.tokenize(texts)
        got, ref = embedder.run(ids), self._reference(reference, ids)
        diff = max(_max_diff(r, g) for r, g in zip(ref, got, strict=True))
        return {"name": "texts", "count": len(texts), "tokens": [len(x) for x in ids], "max_abs_diff": diff}

# --- export -----------------------------------------------------------------------------------------

INPUT_NAMES = ("input_ids", "attention_mask")
DIMS = ("batch_size", "seq_len")


def output_name(pooling: Pooling) -> str:
    return "token_embeddings" if pooling.method == "none" else "sentence_embedding"


def _trial(wrapper: Any, args: tuple[Any, ...], pooling: Pooling) -> tuple[int, ...]:
    """Run the pooled module once in PyTorch and check the output's shape (user functions included)."""
    import torch

    try:
        with torch.no_grad():
            out = wrapper(*args)
    except Exception as exc:
        raise ManifestError(f"pooling.method: {pooling.method} failed on a [2, 8] example: {one_line(exc)}",
                            key="pooling.method") from exc
    rank = 3 if pooling.method == "none" else 2
    ok = isinstance(out, torch.Tensor) and out.dim() == rank and out.shape[0] == args[0].shape[0]
    if not ok:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        want = "[batch, seq, hidden]" if rank == 3 else "[batch, hidden]"
        raise ManifestError(f"pooling.method: {pooling.method} returned {got} for a [2, 8] input; expected "
                            f"a tensor {want}", key="pooling.method")
    return tuple(out.shape)


def _export(wrapper: Any, args: tuple[Any, ...], path: Path, output: str, exporter: str, opset: int) -> None:
    import torch

    if exporter == "dynamo":
        batch, seq = (torch.export.Dim(d) for d in DIMS)
        program = torch.onnx.export(wrapper, args, None, input_names=list(INPUT_NAMES), output_names=[output],
                                    dynamic_shapes={n: {0: batch, 1: seq} for n in INPUT_NAMES},
                                    opset_version=opset, dynamo=True, verbose=False)
        program.save(str(path), external_data=True)
        return
    axes: dict[str, dict[int, str]] = {n: {0: DIMS[0], 1: DIMS[1]} for n in INPUT_NAMES}
    axes[output] = {0: DIMS[0], 1: DIMS[1]} if output == "token_embeddings" else {0: DIMS[0]}
    legacy_export(wrapper, args, path, input_names=list(INPUT_NAMES), output_names=[output],
                  dynamic_axes=axes, opset_version=opset, do_constant_folding=True)


def export_embedding(model: torch.nn.Module, out_dir: Path, pooling: Pooling, *, exporter: str,
                     opset: int) -> dict[str, Any]:
    """Export ``model`` + ``pooling`` to ``out_dir/model.onnx`` (+ ``.data``), checked with onnx.checker."""
    import onnx

    check_args(exporter, opset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, output = out_dir / MODEL_FILE, output_name(pooling)
    wrapper = pooled_module(model, pooling)
    args = example_inputs(int(model.config.vocab_size))
    example_shape = _trial(wrapper, args, pooling)
    before = output_files(out_dir)
    try:
        with quiet():
            _export(wrapper, args, path, output, exporter, opset)
            if exporter == "legacy":
                gather_external_data(path, output_files(out_dir) - before - {MODEL_FILE})
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"{exporter} export of the {pooling.method}-pooled encoder to {path} failed: "
                          f"{one_line(exc)}") from exc
    return {
        "onnx": MODEL_FILE,
        "files": sorted(output_files(out_dir) - (before - {MODEL_FILE, DATA_FILE})),
        "inputs": list(INPUT_NAMES),
        "outputs": [output],
        "dims": list(DIMS),
        "hidden_size": int(example_shape[-1]),
        "vocab_size": int(model.config.vocab_size),
        "pooling": pooling.as_dict(),
        "exporter": exporter,
        "opset": opset,
    }

"""Embed texts with a compiled encoder: tokenise, batch by length, run in the smallest bucket that fits.

Texts are sorted by token count and cut into batches of the compiled batch size. A batch runs in the
smallest sequence-length bucket that holds its longest text. Fixed-shape sessions need the exact
specialisation, so on a backend that runs only those (qaic) the batch is padded to ``[batch_size, bucket]``;
where a dynamic session exists (ONNX Runtime) a batch that does not fill its specialisation runs there,
padded only to its longest text (padding to the bucket would only add work: masked positions change
nothing). A text longer than the largest bucket is an error or is truncated
(``seq.overflow``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import RunError

if TYPE_CHECKING:
    import numpy as np

    from qbuild.execute.executor import BuildResult
    from qbuild.manifest import ComposedManifest
    from qbuild.runtime import Artifact

Progress = Callable[[int, int], None]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def bucket_for(n: int, lengths: Sequence[int]) -> int | None:
    """The smallest bucket >= ``n`` tokens, or None when none is long enough."""
    fitting = [b for b in lengths if b >= n]
    return min(fitting) if fitting else None


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / f).is_file() for f in _TOKENIZER_FILES)


class Tokenizer:
    """Token ids with the model's special tokens, no padding; ``tokenizers`` directly when the directory
    has ``tokenizer.json`` (no torch import), else transformers' AutoTokenizer (``load_tokenizer``)."""

    def __init__(self, directory: Path, truncate_to: int | None = None) -> None:
        directory = Path(directory)
        if not has_tokenizer(directory):
            raise RunError(f"model.tokenizer: no tokenizer in {directory} (no {', '.join(_TOKENIZER_FILES)})",
                           hint="set model.tokenizer to a tokenizer directory or pkg:")
        self.truncate_to = truncate_to
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as Fast

            self._fast: Any = Fast.from_file(str(directory / "tokenizer.json"))
            self._fast.no_padding()  # e.g. all-MiniLM-L6-v2's tokenizer.json pads to 128
            if truncate_to:
                self._fast.enable_truncation(max_length=truncate_to)
            else:
                self._fast.no_truncation()
            pad = (self._fast.padding or {}).get("pad_id")
            pad = pad if pad is not None else self._fast.token_to_id("[PAD]")
            self.pad_id = int(pad if pad is not None else self._fast.token_to_id("<pad>") or 0)
        else:
            from qbuild.models.tokenizer import load_tokenizer

            self._fast, self._auto = None, load_tokenizer(directory)  # never runs the checkpoint's code
            self.pad_id = int(self._auto.pad_token_id or 0)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            return [list(e.ids) for e in self._fast.encode_batch(list(texts))]
        kw = {"truncation": True, "max_length": self.truncate_to} if self.truncate_to else {}
        return [list(ids) for ids in self._auto(list(texts), **kw)["input_ids"]]


def artifact_sessions(artifact_dir: Path, num_threads: int | None = None) -> Any:
    """A compiled artifact's sessions, opened by the backend that compiled it."""
    from qbuild.runtime import open_artifact

    return open_artifact(artifact_dir, threads=num_threads).sessions()


class Embedder:
    """Embeddings from a compiled artifact: ``embed(texts)`` -> ``[N, hidden]`` (a list of ``[n_i, hidden]``
    token embeddings with ``pooling: none``)."""

    def __init__(self, artifact: Path | Artifact, tokenizer_dir: Path | None, *, overflow: str = "error",
                 vocab_size: int | None = None, num_threads: int | None = None) -> None:
        self.sessions = (artifact.sessions() if not isinstance(artifact, (str, Path))
                         else artifact_sessions(Path(artifact), num_threads))
        if hasattr(self.sessions, "stop_spinning"):
            # spin within a run (an op's threads wake without a syscall), stop at its end (between batches the
            # caller pads; an idle session's threads would take its cores): all-MiniLM-L6-v2, 256 texts, 2 threads,
            # each variant in its own process, 4 interleaved rounds: 1.03-1.12x (median 1.08) at batch 32 and
            # 1.01-1.12x (median 1.09) at batch 8 against threads that never spin
            self.sessions.spinning, self.sessions.stop_spinning = True, True
        artifact_dir = artifact if isinstance(artifact, (str, Path)) else artifact.directory
        specs = self.sessions.specializations
        if not specs:
            raise RunError(f"{artifact_dir} has no specialisations (not an embedding artifact)")
        self.lengths = sorted({int(s["symbols"]["seq_len"]) for s in specs})
        self.batch_size = int(specs[0]["symbols"]["batch_size"])
        self.overflow, self.vocab_size = overflow, vocab_size
        self.tokenizer = (Tokenizer(tokenizer_dir, self.lengths[-1] if overflow == "truncate" else None)
                          if tokenizer_dir is not None else None)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text; raises when a text is longer than the largest bucket (``seq.overflow: error``)."""
        if self.tokenizer is None:
            raise RunError("model.tokenizer: this build has no tokenizer")
        ids = self.tokenizer.encode(texts)
        longest = self.lengths[-1]
        over = [(i, len(x)) for i, x in enumerate(ids) if len(x) > longest]
        if over:
            i, n = over[0]
            raise RunError(
                f"text {i} ({texts[i][:40]!r}...) has {n} tokens, more than the largest bucket "
                f"({longest}; seq.lengths {self.lengths}); {len(over)} text(s) too long",
                hint=f"add a longer bucket to seq.lengths or set seq.overflow=truncate "
                                         f"(keeps the first {longest} tokens)")
        top = max((max(x) for x in ids if x), default=0)
        if self.vocab_size is not None and top >= self.vocab_size:
            raise RunError(f"model.tokenizer: token id {top} is outside the model's vocabulary of "
                           f"{self.vocab_size}", hint="use the tokenizer that belongs to the model")
        return ids

    def run(self, ids: Sequence[Sequence[int]], progress: Progress | None = None) -> list[np.ndarray]:
        """One output per sequence of ids (``[hidden]``, or ``[n, hidden]`` for token embeddings)."""
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: list[Any] = [None] * len(ids)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            result = self._run_batch([ids[i] for i in rows])
            for k, i in enumerate(rows):
                out[i] = result[k] if result.ndim == 2 else result[k, : len(ids[i])]
            if progress:
                progress(min(start + self.batch_size, len(order)), len(order))
        return out

    def _run_batch(self, batch: list[Sequence[int]]) -> np.ndarray:
        import numpy as np

        longest = max(len(x) for x in batch)
        bucket = bucket_for(longest, self.lengths)
        if bucket is None:
            raise RunError(f"an input of {longest} tokens exceeds the largest bucket {self.lengths[-1]}",
                           hint="add a larger bucket to seq.lengths, or set seq.overflow=truncate")
        # a fixed-shape session only for a batch that fills its specialisation (or where nothing else runs):
        # padding a batch to its bucket would execute up to twice the useful FLOPs; the dynamic session
        # pads only to the batch's longest text
        fits = len(batch) == self.batch_size and longest == bucket
        fixed = self.sessions.mode == "fixed" and (fits or not getattr(self.sessions, "any_shape", False))
        seq, rows = (bucket, self.batch_size) if fixed else (longest, len(batch))
        input_ids = np.full((rows, seq), self.tokenizer.pad_id if self.tokenizer else 0, dtype=np.int64)
        mask = np.zeros((rows, seq), dtype=np.int64)
        for r in range(rows):
            x = batch[r] if r < len(batch) else batch[0]  # fixed batch: fill with copies of row 0
            input_ids[r, : len(x)], mask[r, : len(x)] = x, 1
        session = self.sessions.session_for({"batch_size": rows, "seq_len": bucket if fixed else seq})
        return session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0][: len(batch)]

    def embed(self, texts: Sequence[str], progress: Progress | None = None) -> Any:
        import numpy as np

        out = self.run(self.tokenize(texts), progress)
        return np.stack(out) if out and out[0].ndim == 1 else out


# --- embedding with a build -----------------------------------------------------------------------


@dataclass
class EmbedResult:
    """Embeddings of ``texts`` (``[N, hidden]`` array, or a list of ``[n_i, hidden]`` token embeddings)."""

    name: str
    texts: list[str]
    embeddings: Any
    pooling: dict[str, Any]
    session: str
    build: BuildResult | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready: one vector per text (token embeddings: one list of vectors per text)."""
        vectors = [e.tolist() for e in self.embeddings]
        dim = int(self.embeddings[0].shape[-1]) if len(self.embeddings) else 0
        return {"name": self.name, "pooling": self.pooling, "session": self.session, "dim": dim,
                "seconds": round(self.seconds, 4), "texts": self.texts, "embeddings": vectors}


def embed_build(composed: ComposedManifest, result: BuildResult, cache: Path, texts: Sequence[str],
                progress: Progress | None = None) -> EmbedResult:
    """Embed ``texts`` with the artifact a finished build produced."""
    import time

    from qbuild.store import Store

    m = composed.manifest
    key = next(s["key"] for s in result.stages if s["name"] == "export")
    store = Store(cache, readonly=True)
    try:
        export, _ = store.lookup("export", key)
    finally:
        store.close()
    meta = export.meta if export else {}
    tok = Path(result.tokenizer_dir or "")
    if not result.tokenizer_dir or not has_tokenizer(tok):
        raise RunError(f"model.tokenizer: no tokenizer in {tok}; qbuild embed needs one",
                       hint="set model.tokenizer to a directory or pkg:<package>")
    t0 = time.perf_counter()
    embedder = Embedder(Path(result.artifacts["compiled"]), tok, overflow=m.seq.overflow,
                        vocab_size=meta.get("vocab_size"))
    vectors = embedder.embed(list(texts), progress)
    return EmbedResult(composed.name, list(texts), vectors, meta.get("pooling", {}), embedder.sessions.mode,
                       result, time.perf_counter() - t0)

"""Greedy generation on a compiled retained-state KV-cache causal LM with ONNX Runtime.

Prefill runs in chunks of the smallest bucket that holds the longest prompt (the largest bucket,
several times, for longer prompts); decode runs one token per step. The caches stay in ONNX Runtime
``OrtValue``s bound with IOBinding: each step reads one set and writes the other (double buffering),
so no cache is copied through numpy between steps. Rows of a batch keep their own positions; padding
positions are -1 and write nothing.

An artifact whose attention is ONNX Runtime's GroupQueryAttention (``session.json``: ``kv_attention:
group_query``) writes its caches in place: one set, bound as input and output. Its kernel takes several rows
with a past only one token at a time, so a batch whose prompts need more than one prefill chunk is prefilled
row by row (into views of the batch's caches), and a last chunk that would run past ``ctx_len`` starts earlier,
at ``ctx_len - chunk`` (the tokens it repeats are written again with the same values).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbuild.errors import RunError


@dataclass
class Generation:
    """Generated token ids per prompt (EOS included when reached) and timings."""

    tokens: list[list[int]]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    chunks: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


class KVRuntime:
    """A compiled KV-cache causal LM, ready to generate."""

    def __init__(self, compiled: Path, *, ctx_len: int, buckets: Sequence[int], num_threads: int | None = None,
                 session: Any = None) -> None:
        from qbuild.runtime.onnxruntime import open_sessions

        self.sessions = open_sessions(compiled, num_threads)  # fixed-shape per specialisation, or dynamic
        self._fixed = session is None and self.sessions.mode == "fixed"
        # fixed mode opens only the specialisations it runs (each session holds its own prepacked weights):
        # the graph's inputs come from session.json, not from a dynamic session opened to read them
        self.session = session or (None if self._fixed else self.sessions.session_for({}))
        self.ctx_len, self.buckets = ctx_len, sorted(buckets)
        recorded = self.sessions.info.get("inputs") or []
        if self.session is not None or not recorded:
            self.session = self.session or self.sessions.session_for({})
            recorded = [{"name": i.name, "shape": list(i.shape), "type": i.type} for i in self.session.get_inputs()]
        self.kv_inputs = [i["name"] for i in recorded if i["name"].startswith(("past_key.", "past_value."))]
        shapes = {i["name"]: [int(d) if str(d).isdigit() else d for d in i["shape"]] for i in recorded}
        _, self.kv_heads, _, self.head_dim = shapes[self.kv_inputs[0]]
        if not all(isinstance(d, int) for d in (self.kv_heads, self.head_dim)):
            shape = shapes[self.kv_inputs[0]]
            raise RunError(f"{compiled}: KV cache inputs need static heads and head_dim, got {shape}")
        self.has_lora = "lora_ids" in shapes  # several LoRA adapters in one program (issue 15)
        types = {i["name"]: i.get("type") for i in recorded}
        # the caches in the graph's own dtype (a float16 export reads and writes float16 caches)
        self.kv_dtype = "float16" if types.get(self.kv_inputs[0]) == "tensor(float16)" else "float32"
        self.in_place = self.sessions.info.get("kv_attention") == "group_query"

    def lora_feed(self, lora_ids: Sequence[int] | None, batch: int) -> Any:
        """``lora_ids [batch, 1]`` for a program with adapters (none given: 0, the base model), else None."""
        import numpy as np

        if not getattr(self, "has_lora", False):
            if lora_ids is not None and any(lora_ids):
                raise RunError("this artifact was built without model.adapters: it serves the base model only",
                               hint="add model.adapters to the manifest, or drop --adapter")
            return None
        ids = np.zeros((batch, 1), np.int64) if lora_ids is None else np.asarray(lora_ids, np.int64).reshape(-1, 1)
        if ids.shape[0] != batch:
            raise RunError(f"{ids.shape[0]} adapter ids for {batch} prompts; give one per prompt")
        return ids

    def _chunk_len(self, longest: int) -> int:
        return next((n for n in self.buckets if n >= longest), self.buckets[-1])

    def _alloc(self, batch: int) -> None:
        import numpy as np
        import onnxruntime as ort

        shape = (batch, self.kv_heads, self.ctx_len, self.head_dim)
        sets = 1 if self.in_place else 2  # in place: the step writes the caches it reads
        self._arrays = [[np.zeros(shape, self.kv_dtype) for _ in self.kv_inputs] for _ in range(sets)]
        self._kv = [[ort.OrtValue.ortvalue_from_numpy(a) for a in arrays] for arrays in self._arrays]
        if self.in_place:
            self._kv.append(self._kv[0])
        self._bindings: dict[int, tuple[Any, Any]] = {}

    def _binding(self, batch: int, seq: int) -> tuple[Any, Any]:
        """The session for this shape (its fixed-shape specialisation when compiled so) and its IOBinding."""
        session = self.session
        if self._fixed:
            session = self.sessions.session_for({"batch_size": batch, "seq_len": seq, "ctx_len": self.ctx_len})
        if id(session) not in self._bindings:
            self._bindings[id(session)] = (session, session.io_binding())
        return self._bindings[id(session)]

    def _step(self, ids: Any, pos: Any) -> Any:
        """One forward: logits [batch, 1, vocab]; the written caches become the next step's inputs."""
        session, io = self._binding(*ids.shape)
        kv_in, kv_out = self._kv
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_output("logits")
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("position_ids", pos)
        if getattr(self, "_lora", None) is not None:
            io.bind_cpu_input("lora_ids", self._lora)
        for name, cur, nxt in zip(self.kv_inputs, kv_in, kv_out, strict=True):
            io.bind_ortvalue_input(name, cur)
            io.bind_ortvalue_output(f"{name}_RetainedState", nxt)
        session.run_with_iobinding(io)
        self._kv.reverse()
        return io.get_outputs()[0].numpy()

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[Any, int]:
        """Run the prompts through the model; the logits at each prompt's last token and the chunk count."""
        import numpy as np

        lens = [len(p) for p in prompts]
        chunk = self._chunk_len(max(lens))
        n_chunks = math.ceil(max(lens) / chunk)
        if self.in_place and len(prompts) > 1 and n_chunks > 1:
            return self._prefill_rows(prompts)
        starts = [k * chunk for k in range(n_chunks)]
        if self.in_place:  # GroupQueryAttention writes the whole chunk: keep it inside the cache
            starts[-1] = max(0, min(starts[-1], self.ctx_len - chunk))
        last = None
        for start in starts:
            ids = np.zeros((len(prompts), chunk), np.int64)
            pos = np.full((len(prompts), chunk), -1, np.int64)
            for b, p in enumerate(prompts):
                seg = p[start:start + chunk]
                ids[b, :len(seg)] = seg
                pos[b, :len(seg)] = np.arange(start, start + len(seg))
            logits = self._step(ids, pos)[:, 0]
            last = logits.copy() if last is None else last
            ends_here = [start < n <= start + chunk for n in lens]
            last[ends_here] = logits[ends_here]
        return last, n_chunks

    def _prefill_rows(self, prompts: Sequence[Sequence[int]]) -> tuple[Any, int]:
        """:meth:`prefill` one prompt at a time, each into its row of the batch's caches (views, no copy)."""
        import numpy as np
        import onnxruntime as ort

        batch_kv, lora, rows, chunks = self._kv, getattr(self, "_lora", None), [], 0
        try:
            for b, p in enumerate(prompts):
                views = [ort.OrtValue.ortvalue_from_numpy(a[b:b + 1]) for a in self._arrays[0]]
                self._kv, self._lora = [views, views], None if lora is None else lora[b:b + 1]
                logits, n = self.prefill([p])
                rows.append(logits[0])
                chunks += n
        finally:
            self._kv, self._lora = batch_kv, lora
        return np.stack(rows), chunks

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int | Sequence[int] | None,
                 on_token: Callable[[int, int], None] | None = None,
                 lora_ids: Sequence[int] | None = None) -> Generation:
        """Greedy tokens for each prompt; ``on_token(row, token)`` streams them as they come; ``lora_ids``: each
        prompt's adapter id in a program built with ``model.adapters`` (0: the base model)."""
        import numpy as np

        if not prompts or any(len(p) == 0 for p in prompts):
            raise RunError("every prompt needs at least one token")
        self._check_fits(max(len(p) for p in prompts), max_new_tokens, "new tokens",
                         hint="raise seq.ctx_len or lower --max-new-tokens")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        self._lora = self.lora_feed(lora_ids, len(prompts))
        self._alloc(len(prompts))
        t0 = time.perf_counter()
        logits, chunks = self.prefill(prompts)
        t1 = time.perf_counter()
        pos = np.array([len(p) for p in prompts], np.int64)
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        steps = 0
        while True:
            nxt = logits.argmax(-1)
            for b in np.flatnonzero(~done):
                out[b].append(int(nxt[b]))
                if on_token:
                    on_token(int(b), int(nxt[b]))
                done[b] = int(nxt[b]) in eos or len(out[b]) >= max_new_tokens
            if done.all():
                break
            logits = self._step(nxt[:, None].astype(np.int64), np.where(done, -1, pos)[:, None])[:, 0]
            pos += 1
            steps += 1
        return Generation(out, t1 - t0, time.perf_counter() - t1, steps, chunks)

    def _check_fits(self, prompt: int, more: int, what: str, hint: str | None = None) -> None:
        """A prompt of ``prompt`` tokens and ``more`` after it must fit in the static cache."""
        if prompt + more > self.ctx_len:
            raise RunError(f"a prompt of {prompt} tokens + {more} {what} exceeds seq.ctx_len={self.ctx_len}",
                           hint=hint)

    def forced_logits(self, prompt: Sequence[int], tokens: Sequence[int], lora_id: int | None = None) -> Any:
        """Logits ``[len(tokens), vocab]`` (float32) of each step when ``tokens`` are fed back whatever the model
        would pick (teacher forcing): row 0 is the prompt's next-token logits, row ``i`` follows ``tokens[:i]``.
        Compares two builds (e.g. fp32 and int8) step by step on the same history; one flipped argmax does not
        derail the rest, as it does in greedy generation."""
        import numpy as np

        if not prompt or not tokens:
            raise RunError("forced_logits needs a prompt and at least one token")
        self._check_fits(len(prompt), len(tokens), "tokens")
        self._lora = self.lora_feed(None if lora_id is None else [lora_id], 1)
        self._alloc(1)
        logits, _ = self.prefill([prompt])
        rows = [logits[0]]
        for i, t in enumerate(tokens[:-1]):
            rows.append(self._step(np.array([[t]], np.int64), np.array([[len(prompt) + i]], np.int64))[0, 0])
        return np.stack(rows).astype(np.float32)


def open_runtime(compiled: Path, *, ctx_len: int, buckets: Sequence[int], num_threads: int | None = None) -> KVRuntime:
    """The generation loop on a compiled artifact, opened by the backend that compiled it."""
    from qbuild.runtime import open_artifact

    return open_artifact(compiled, threads=num_threads).kv_runtime(ctx_len=ctx_len, buckets=buckets)

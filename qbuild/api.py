"""The Python API the CLI calls: compose a manifest, plan it, build it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.execute.executor import BuildResult, execute
from qbuild.execute.reporter import Reporter
from qbuild.manifest import ComposedManifest, compose
from qbuild.plan.planner import Plan, make_plan
from qbuild.store import Store, default_cache_dir

if TYPE_CHECKING:
    from qbuild.qeff.manifest import ApiManifest
    from qbuild.qeff.runnable import CompiledModel
    from qbuild.runtime.embed import EmbedResult

__all__ = ["BuildResult", "RunResult", "build", "embed", "load", "plan", "run"]

PathLike = str | os.PathLike
#: the stages a build may stop after (``build(..., until=...)``)
STAGE_ORDER = ("load", "export", "compile", "verify")
#: the other stages -> the step of STAGE_ORDER they belong to (``until="compile"`` builds both VLM branches);
#: their own names are accepted too (``until="compile_vision"``: that stage and its upstream only)
STAGE_STEP = {"finetune": "export", "adapters": "export", "export_vision": "export", "compile_vision": "compile"}


def _cache(cache_dir: PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _composed(manifest: PathLike | ComposedManifest | ApiManifest, overrides: Sequence[str], cache: Path, *,
              write: bool) -> ComposedManifest:
    if isinstance(manifest, ComposedManifest):
        return manifest
    from qbuild.qeff.manifest import ApiManifest

    if isinstance(manifest, ApiManifest):
        return manifest.compose(cache, overrides, write=write)
    return compose(manifest, list(overrides), memo_dir=cache / "compose", memo_write=write)


def plan(manifest: PathLike | ComposedManifest | ApiManifest, overrides: Sequence[str] = (), *,
         cache_dir: PathLike | None = None, remote: PathLike | None = None) -> Plan:
    """Plan a build: per stage its key, state and reasons (and what the remote cache holds). Writes nothing."""
    cache = _cache(cache_dir)
    composed = _composed(manifest, overrides, cache, write=False)
    store = Store(cache, readonly=True, remote=_remote(remote, composed))
    try:
        return make_plan(composed, store)
    finally:
        store.close()


def _remote(remote: PathLike | None, composed: ComposedManifest) -> Any:
    """The remote cache: ``remote`` (``--remote``), else the manifest's ``cache.remote``, else
    ``$QBUILD_REMOTE``; None when none is set (fsspec is imported only for a URL remote)."""
    from qbuild.store.remote import open_remote

    return open_remote(remote, composed.manifest.cache.remote)


def build(manifest: PathLike | ComposedManifest | ApiManifest, overrides: Sequence[str] = (), *,
          cache_dir: PathLike | None = None, reporter: Reporter | None = None,
          remote: PathLike | None = None, until: str | None = None) -> BuildResult:
    """Build what is missing from the cache and return the stages and artifacts. ``remote`` (else the
    manifest's ``cache.remote``, else ``$QBUILD_REMOTE``): a remote cache (a directory, or an fsspec URL such
    as ``s3://bucket/prefix``) to pull missing entries from and push builds to. ``until``: stop after that
    stage (``load``, ``export``, ``compile``: every stage of that step, both branches of a VLM; or a stage's
    own name such as ``compile_vision``: it and its upstream; default: every stage); the keys are those of a
    full build."""
    cache = _cache(cache_dir)
    if until is not None and until not in (*STAGE_ORDER, *STAGE_STEP):
        from qbuild.errors import ManifestError
        from qbuild.manifest.validate import suggest

        raise ManifestError(f"until: unknown stage {until!r}; stages: {', '.join((*STAGE_ORDER, *STAGE_STEP))}"
                            f"{suggest(str(until), (*STAGE_ORDER, *STAGE_STEP))}", key="until")
    composed = _composed(manifest, overrides, cache, write=True)  # bad input fails before any write
    return _build(composed, cache, reporter, remote=remote, until=until)


def _build(composed: ComposedManifest, cache: Path, reporter: Reporter | None, *, execute_as: str = "",
           remote: PathLike | None = None, until: str | None = None) -> BuildResult:
    """Plan and execute; with ``execute_as`` (a command name), first check that this machine can execute the
    artifact, as its backend says for the options it will be compiled with (before a long compile).
    ``until``: execute the stages up to and including that one only."""
    with _built(composed, cache, reporter, execute_as=execute_as, remote=remote, until=until) as result:
        return result


@contextlib.contextmanager
def _built(composed: ComposedManifest, cache: Path, reporter: Reporter | None, *, execute_as: str = "",
           remote: PathLike | None = None, until: str | None = None) -> Iterator[BuildResult]:
    """:func:`_build`, holding every entry the build used against ``qbuild cache gc`` / ``rm`` (the store's
    shared locks on their use markers) until the block ends: run and embed read the artifact inside it."""
    import dataclasses

    store = Store(cache, remote=_remote(remote, composed))
    reporter = reporter or Reporter()
    try:
        the_plan = make_plan(composed, store)
        if until is not None:
            the_plan = dataclasses.replace(the_plan, stages=_until(the_plan.stages, until))
        if execute_as:
            _check_executable(the_plan, execute_as)
        reporter.emit({"event": "plan", "notes": the_plan.notes,
                       "stages": [{"name": s.name, "key": s.key, "state": s.state, "reasons": s.reasons}
                                  for s in the_plan.stages]})
        result = execute(the_plan, store, reporter)
        reporter.close()
        yield result
    finally:
        store.close()
        reporter.close()


def _until(stages: list[Any], until: str) -> list[Any]:
    """The planned stages a build ``until`` a stage executes: for a step of STAGE_ORDER every stage of that step
    or an earlier one (by STAGE_STEP); for another stage's name, that stage and its upstream."""
    if until in STAGE_ORDER:
        last = STAGE_ORDER.index(until)
        return [s for s in stages
                if STAGE_ORDER.index(STAGE_STEP.get(s.name, s.name if s.name in STAGE_ORDER else "verify")) <= last]
    by_name = {s.name: s for s in stages}
    if until not in by_name:
        from qbuild.errors import ManifestError

        raise ManifestError(f"until: this build has no {until} stage; its stages: {', '.join(by_name)}", key="until")
    keep, todo = set(), [until]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += list(by_name[name].stage.upstream)
    return [s for s in stages if s.name in keep]


def _check_executable(the_plan: Plan, command: str) -> None:
    from qbuild.errors import CannotExecute

    compiled = the_plan.stage("compile")
    backend = compiled.stage.backend
    ok, why = backend.can_execute(compiled.resolved.params)
    if not ok:
        raise CannotExecute(f"{command} cannot execute a {backend.name} artifact on this machine: {why}",
                            hint=f"build with `qbuild MANIFEST` and {command} where the runtime is; "
                                 "or use compile=onnxruntime")


@dataclass
class RunResult:
    """Generated tokens and text per prompt, with timings."""

    prompts: list[str]
    tokens: list[list[int]]
    texts: list[str]
    stats: dict[str, Any] = field(default_factory=dict)  # timings, counts, the tokenizer used

    def to_json(self) -> dict[str, Any]:
        return {"results": [{"prompt": p, "tokens": t, "text": x}
                            for p, t, x in zip(self.prompts, self.tokens, self.texts, strict=True)],
                "stats": self.stats}


def run(manifest: PathLike | ComposedManifest | ApiManifest, overrides: Sequence[str] = (), *, prompts: Sequence[str],
        max_new_tokens: int = 32, cache_dir: PathLike | None = None, reporter: Reporter | None = None,
        on_text: Callable[[int, str], None] | None = None, remote: PathLike | None = None,
        adapters: Sequence[str] = (), images: Sequence[str | None] = ()) -> RunResult:
    """Build what is missing, then generate greedily for each prompt (``on_text`` streams row text);
    ``remote`` as in :func:`build`; ``adapters``: the LoRA adapter of each prompt, or one for all (names of the
    manifest's ``model.adapters``; ``base``: the base model); ``images``: an image path (or None) per prompt
    of an image-text-to-text model (issue 13)."""
    from qbuild.errors import RunError
    from qbuild.tasks import task_name

    cache = _cache(cache_dir)
    composed = _composed(manifest, overrides, cache, write=True)
    if task_name(composed.manifest).startswith("image_text_to_text"):
        if adapters:
            raise RunError("--adapter: this manifest serves no LoRA adapters (model.adapters is for a KV causal LM)")
        return _generate_vlm(composed, cache, reporter, remote, list(prompts), images, max_new_tokens, on_text)
    if images:
        raise RunError("--image: this manifest builds a text-only model", hint="use an image-text-to-text manifest")
    if task_name(composed.manifest) != "causal_lm_kv":
        embedding = composed.manifest.model.task == "embedding"
        hint = ("an embedding model does not generate: use qbuild embed MANIFEST --text TEXT" if embedding
                else "add transforms=kv_cache: the runtime generates with the retained-state KV cache")
        raise RunError(f"qbuild run generates with a KV-cache causal LM; {composed.source.name} builds task "
                       f"{task_name(composed.manifest)}", hint=hint)
    from qbuild.manifest.adapters import adapter_names
    from qbuild.runtime.lora import BASE, adapter_ids

    adapter_ids([BASE, *adapter_names(composed.manifest)], adapters, len(prompts))  # before building: bad names
    with _built(composed, cache, reporter, execute_as="qbuild run", remote=remote) as result:
        return _generate(composed, result, list(prompts), max_new_tokens, on_text, adapters)


def _generate_vlm(composed: ComposedManifest, cache: Path, reporter: Reporter | None, remote: PathLike | None,
                  prompts: list[str], images: Sequence[str | None], max_new_tokens: int,
                  on_text: Callable[[int, str], None] | None) -> RunResult:
    """Build what is missing of an image-text-to-text manifest, then generate for its image+prompt pairs."""
    from qbuild.vlm.runtime import generate_build, pair_images

    paired = pair_images(images, prompts)  # before building: a missing file fails fast
    m = composed.manifest
    with _built(composed, cache, reporter, execute_as="qbuild run", remote=remote) as result:
        tokens, texts, stats = generate_build(result.artifacts, m.seq.ctx_len, m.seq.lengths, prompts, paired,
                                          max_new_tokens, on_text)
    return RunResult(prompts, tokens, texts, stats)


def _generate(composed: ComposedManifest, result: BuildResult, prompts: list[str], max_new_tokens: int,
              on_text: Callable[[int, str], None] | None, adapters: Sequence[str] = ()) -> RunResult:
    from qbuild.runtime.generate import open_runtime
    from qbuild.runtime.tokenizer import open_tokenizer

    m = composed.manifest
    assert result.tokenizer_dir is not None and result.model_dir is not None
    export_dir = Path(result.artifacts["onnx"]).parent if "onnx" in result.artifacts else None
    tok = open_tokenizer(export_dir, Path(result.tokenizer_dir), Path(result.model_dir))
    ids = tok.encode(prompts)
    rt = open_runtime(Path(result.artifacts["compiled"]), ctx_len=m.seq.ctx_len, buckets=m.seq.lengths)
    streamed: list[list[int]] = [[] for _ in prompts]
    shown = [0] * len(prompts)  # characters of each row's text already passed to on_text

    def emit(row: int, text: str, final: bool) -> None:
        # hold back text that ends inside a multi-byte character (byte-level BPE) until it completes
        if on_text and len(text) > shown[row] and (final or not text.endswith("\ufffd")):
            on_text(row, text[shown[row]:])
            shown[row] = len(text)

    def on_token(row: int, token: int) -> None:
        streamed[row].append(token)
        emit(row, tok.decode(streamed[row]), final=False)

    from qbuild.runtime.lora import adapter_ids, known_adapters

    lora_ids = adapter_ids(known_adapters(export_dir), adapters, len(prompts))
    g = rt.generate(ids, max_new_tokens, tok.eos_token_id, on_token, lora_ids=lora_ids)
    texts = [tok.decode(t) for t in g.tokens]
    for row, text in enumerate(texts):
        emit(row, text, final=True)
    new = sum(len(t) for t in g.tokens)
    stats = {"prefill_s": round(g.prefill_s, 4), "decode_s": round(g.decode_s, 4), "new_tokens": new,
             "prefill_chunks": g.chunks,
             "decode_tok_s": round(g.decode_steps * len(prompts) / g.decode_s, 2) if g.decode_s else 0.0,
             "tokenizer": tok.kind}
    if lora_ids is not None:
        stats["lora_ids"] = lora_ids
    return RunResult(prompts, g.tokens, texts, stats)


def embed(manifest: PathLike | ComposedManifest | ApiManifest, texts: Sequence[str], overrides: Sequence[str] = (), *,
          cache_dir: PathLike | None = None, reporter: Reporter | None = None,
          progress: Callable[[int, int], None] | None = None, remote: PathLike | None = None) -> EmbedResult:
    """Build what is missing, then embed ``texts`` with the compiled artifact (``model.task: embedding``);
    ``remote`` as in :func:`build`."""
    from qbuild.errors import ManifestError
    from qbuild.runtime.embed import embed_build

    cache = _cache(cache_dir)
    composed = _composed(manifest, overrides, cache, write=True)
    m = composed.manifest
    if m.model.task != "embedding":
        raise ManifestError(f"model.task: qbuild embed needs an embedding model, not {m.model.task}",
                            key="model.task", hint="use an encoder manifest, e.g. manifests/minilm.yaml")
    with _built(composed, cache, reporter, execute_as="qbuild embed", remote=remote) as result:
        return embed_build(composed, result, cache, texts, progress)


def load(source: PathLike | ComposedManifest | ApiManifest, overrides: Sequence[str] = (), *,
         cache_dir: PathLike | None = None, reporter: Reporter | None = None,
         remote: PathLike | None = None) -> CompiledModel:
    """A runnable model: ``source`` is a manifest (file, composed, or a QEFF model's ``model.manifest``),
    built first (what is cached is reused), or a compiled artifact directory (the compile stage's
    output, or a bundle written by ``qbuild --out``). The result generates (KV causal LMs) or embeds
    (encoders) with the artifact, on the backend recorded in it."""
    from qbuild.qeff.runnable import CompiledModel

    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        if overrides:
            from qbuild.errors import ManifestError

            raise ManifestError("overrides apply to a manifest, not to a compiled artifact directory",
                                key="overrides")
        return CompiledModel.from_dir(Path(source))
    cache = _cache(cache_dir)
    composed = _composed(source, overrides, cache, write=True)
    result, release = build_held(composed, cache, reporter, remote=remote)
    return CompiledModel.from_build(composed, result).holding(release)


def build_held(composed: ComposedManifest, cache: Path, reporter: Reporter | None = None, *,
               remote: PathLike | None = None, until: str | None = None) -> tuple[BuildResult, Callable[[], None]]:
    """:func:`build` (``until`` a step or stage name as there), with every entry it used held against ``qbuild
    cache gc`` / ``rm`` until ``release()`` is called (a runnable model reads its artifact long after the build:
    :meth:`CompiledModel.holding`)."""
    held = _built(composed, cache, reporter, remote=remote, until=until)
    result = held.__enter__()
    return result, lambda: held.__exit__(None, None, None)

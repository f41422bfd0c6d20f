"""Causal LM with the retained-state KV cache: Prefill buckets + Decode; verified by greedy tokens.

Export (the ``kv_cache`` rewrite applied): inputs ``input_ids`` int64 ``[batch_size, seq_len]``,
``position_ids`` int64 ``[batch_size, seq_len]`` (padding -1), ``past_key.{i}`` / ``past_value.{i}``
``[batch_size, num_kv_heads, ctx_len, head_dim]``. Outputs, in order: ``logits`` float32
``[batch_size, 1, vocab]`` (last valid position of each row), then ``past_key.{i}_RetainedState``,
``past_value.{i}_RetainedState`` per layer. The dims ``batch_size``, ``seq_len`` and ``ctx_len`` are
symbolic, so the graph does not depend on the buckets, the context length or the batch size: those
shape only the specialisations (compile). Custom ops (``custom_rmsnorm``) are ONNX functions appended
to the model, so ONNX Runtime runs the same graph. Verify: the artifact's greedy tokens must equal
HF ``generate(do_sample=False)`` on the untransformed model.

A build compiled by qaic exports QEfficient's graph form (``graph: qaic``, keyed by the export): the
cache is written and read through ``com.qualcomm.cloud::CtxScatter`` / ``CtxGather`` and every RMSNorm
is ``com.qti.aisw.onnx::CustomRMSNorm``, all ONNX functions with standard-op bodies (qbuild.transforms.
custom_ops), and a bfloat16 model is exported in float32 on ai100. The onnxruntime build keeps the model's
own norms and, with ``compile.onnxruntime.attention=auto`` (the default), exports the cache write and attention
of every family but Llama 4 and SwiftKV as ONNX Runtime's ``GroupQueryAttention`` (``graph: fused``; the caches
written in place, under the padding contract of qbuild.transforms.models.llama.gqa_slots); otherwise the plain
form (``ScatterElements`` and masked MatMul attention).

Beside the graph, export saves ``tokenizer/``: the ``tokenizers`` pipeline transformers builds for the model's
tokenizer, with the EOS ids of its generation config, so that ``qbuild run`` tokenises exactly as transformers
does without importing it (qbuild.runtime.tokenizer).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import ExportError, VerifyError, one_line
from qbuild.manifest.schema import Manifest
from qbuild.tasks import Task
from qbuild.tasks.export_common import (
    DATA_FILE,
    MODEL_FILE,
    check_args,
    check_model,
    gather_external_data,
    legacy_export,
    output_files,
    quiet,
    rewrite_small,
)

if TYPE_CHECKING:
    from qbuild.runtime import Artifact
    from qbuild.stages.base import StageContext, TokenizerRef
    from qbuild.stages.export import ExportParams
    from qbuild.stages.verify import VerifyParams

#: example shapes traced: any values will do (the dims are symbolic) as long as they differ from each
#: other and from the model's head counts and sizes, so that no dims get unified
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_CTX = 2, 5, 23


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


@dataclass(frozen=True)
class KVExport:
    tokenizer: TokenizerRef  # saved beside the graph for the runtime
    # "qaic": CtxScatter/CtxGather and CustomRMSNorm (a build compiled by qaic); "fused": GroupQueryAttention where
    # the family allows (compile.onnxruntime.attention=auto), else plain
    graph: str = "plain"
    dtype: str | None = None  # the dtype exported in when not model.dtype (bfloat16 on ai100: float32)
    sub_functions: bool = False  # compile.qaic.use_onnx_subfunctions: decoder layers as ONNX functions


@dataclass(frozen=True)
class KVVerify:
    prompts: tuple[str, ...]
    max_new_tokens: int
    lengths: tuple[int, ...]
    ctx_len: int


class KVCausalLMTask(Task):
    name = "causal_lm_kv"
    code = ("tasks/__init__.py", "tasks/kv_causal_lm.py", "tasks/export_common.py")
    retained_state = True
    #: a qaic build of this task exports the qaic graph form (qbuild.backends.qaic.export_graph)
    qaic_graph = True

    def export_options(self, m: Manifest) -> KVExport:
        from qbuild.backends.qaic import export_graph
        from qbuild.stages.load import resolve_model

        tokenizer = resolve_model(m)[1]
        qaic = export_graph(m)
        if qaic is None:
            return KVExport(tokenizer, "fused" if m.compile.onnxruntime.attention == "auto" else "plain")
        return KVExport(tokenizer, "qaic", qaic.dtype, qaic.sub_functions)

    def export(self, model: Any, out: Path, p: ExportParams, ctx: StageContext) -> dict[str, Any]:
        o = p.options if isinstance(p.options, KVExport) else None
        info = export_kv_causal_lm(model, out, exporter=p.exporter, opset=p.opset,
                                   graph=o.graph if o else "plain", dtype=o.dtype if o else None,
                                   sub_functions=o.sub_functions if o else False)
        return {**info, "runtime_tokenizer": save_tokenizer(model, out, p, ctx)}

    def specializations(self, m: Manifest) -> list[dict[str, Any]]:
        """One Prefill per bucket, then Decode (seq_len 1), as QEfficient compiles them. ``seq.lengths=[1]``
        alone is one specialisation named Prefill: QEfficient omits the Decode of a ``prefill_seq_len`` of 1
        (a duplicate) and names the one left by its prefill builder."""
        b, ctx = m.seq.batch_size, m.seq.ctx_len
        prefill = [n for n in m.seq.lengths if n > 1]
        decode = {"batch_size": b, "seq_len": 1, "ctx_len": ctx}
        if not prefill:
            return [{"name": "Prefill", "symbols": decode}]
        specs = [{"name": name, "symbols": {"batch_size": b, "seq_len": n, "ctx_len": ctx}}
                 for name, n in zip(_names("Prefill", len(prefill)), prefill, strict=True)]
        return [*specs, {"name": "Decode", "symbols": decode}]

    def calibration_inputs(self, specializations: list[dict[str, Any]], vocab_size: int, *,
                           graph_inputs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """What a quantisation is measured on: per prefill bucket, 8 prompts of random ids from the upper part of
        the vocabulary (seeded) filling the bucket from position 0, on empty caches; the first output, the
        logits at each prompt's last token, is what the cosine compares. Needs ``graph_inputs`` (cache shapes)."""
        import numpy as np

        from qbuild.backends.onnxruntime import generic_feed

        if not graph_inputs:
            return []
        rng = np.random.default_rng(0)
        low, rows = min(1000, vocab_size // 2), 8
        # the prefill buckets (decode is the same graph at seq_len 1); a decode-only build has only that
        prefill = [s for s in specializations if int(s["symbols"]["seq_len"]) > 1] or list(specializations)
        feeds = []
        for spec in prefill:
            feed = generic_feed(graph_inputs, {**spec["symbols"], "batch_size": rows})  # empty caches, adapter 0
            if feed is None or "input_ids" not in feed:
                return []
            feed["input_ids"] = rng.integers(low, vocab_size, size=feed["input_ids"].shape).astype(np.int64)
            feeds.append(feed)
        return feeds

    def verify_options(self, m: Manifest) -> KVVerify:
        v = m.verify
        return KVVerify(tuple(v.prompts), v.max_new_tokens, tuple(m.seq.lengths), m.seq.ctx_len)

    def verify(self, p: VerifyParams, ctx: StageContext, artifact: Artifact) -> dict[str, Any]:
        """Greedy tokens of the compiled artifact must equal HF ``generate(do_sample=False)``."""
        o: KVVerify = p.check
        tokenizer, hf = reference_model(p, ctx)
        prompts = [tokenizer(x)["input_ids"] for x in o.prompts]
        ctx.progress(f"HF generate: {len(prompts)} prompts x {o.max_new_tokens} tokens", None)
        expected = [hf_greedy(hf, ids, o.max_new_tokens, tokenizer) for ids in prompts]
        ctx.progress(f"generate with the compiled artifact ({artifact.backend})", None)
        runtime = artifact.kv_runtime(ctx_len=o.ctx_len, buckets=o.lengths)
        generation = runtime.generate(prompts, o.max_new_tokens, hf.generation_config.eos_token_id)
        got = generation.tokens
        for text, want, have in zip(o.prompts, expected, got, strict=True):
            if want != have:
                at = first_difference(want, have)
                raise VerifyError(f"greedy tokens differ from HF generate for prompt {text!r} at new token {at}: "
                                  f"expected {want[at:at + 4]}..., got {have[at:at + 4]}...",
                                  hint="compare `qbuild run` output with transformers generate on the same weights")
        return {"prompts": list(o.prompts), "max_new_tokens": o.max_new_tokens, "tokens": got,
                "prompt_tokens": [len(x) for x in prompts], "buckets": runtime.buckets,
                "prefill_chunks": generation.chunks}


# --- export -----------------------------------------------------------------------------------------



def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names for ``num_layers`` layers."""
    cache = [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "position_ids", *cache], ["logits", *(f"{n}_RetainedState" for n in cache)]


def _wrapper(model: Any, num_layers: int) -> Any:
    """A module whose forward names every cache argument (the dynamo exporter needs explicit names)."""
    import torch

    args = ", ".join(f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value"))
    namespace: dict[str, Any] = {}
    exec(  # noqa: S102 - generated signature only; the body forwards to the model
        f"def forward(self, input_ids, position_ids, {args}):\n"
        f"    return self.inner(input_ids, position_ids, {args})\n",
        namespace,
    )
    cls = type("KVExportWrapper", (torch.nn.Module,), {"forward": namespace["forward"]})
    wrapper = cls()
    wrapper.inner = model
    return wrapper.eval()


def example_inputs(model: Any) -> tuple[Any, ...]:
    """Batch 2: a continuing row and a left-padded row; random caches of ``_EXAMPLE_CTX`` slots."""
    import torch

    batch, seq, ctx_len = _EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_CTX
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, int(model.config.vocab_size), (batch, seq), generator=gen)
    position_ids = torch.arange(seq).repeat(batch, 1) + 1  # continues after one cached token
    position_ids[1:, :2] = -1  # left padding
    heads, head_dim = model.kv_cache_shape()
    dtype = next(model.parameters()).dtype
    layers = model.kv_num_layers()
    past = [torch.randn(batch, heads, ctx_len, head_dim, generator=gen).to(dtype) for _ in range(2 * layers)]
    return (input_ids, position_ids, *past)


def _axes(inputs: list[str], outputs: list[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch_size", 1: "seq_len"},
                                       "position_ids": {0: "batch_size", 1: "seq_len"}, "logits": {0: "batch_size"}}
    for name in inputs[2:] + outputs[1:]:
        axes[name] = {0: "batch_size", 2: "ctx_len"}
    return axes


Names = tuple[list[str], list[str]]


def _export_legacy(wrapper: Any, args: tuple[Any, ...], path: Path, opset: int, names: Names,
                   functions: set[type] | None = None) -> None:
    """``functions``: the module classes exported as ONNX functions (``export_modules_as_functions``)."""
    extra = {"export_modules_as_functions": functions} if functions else {}
    legacy_export(wrapper, args, path, input_names=names[0], output_names=names[1],
                  dynamic_axes=_axes(*names), opset_version=opset, do_constant_folding=True, **extra)


def _export_dynamo(wrapper: Any, args: tuple[Any, ...], path: Path, opset: int, names: Names) -> None:
    import torch

    from qbuild.transforms.custom_ops import dynamo_translation_table

    batch, seq, ctx = (torch.export.Dim(n) for n in ("batch_size", "seq_len", "ctx_len"))
    shapes: list[Any] = [{0: batch, 1: seq}, {0: batch, 1: seq}] + [{0: batch, 2: ctx}] * (len(args) - 2)
    program = torch.onnx.export(wrapper, args, None, input_names=names[0], output_names=names[1],
                                dynamic_shapes=tuple(shapes), opset_version=opset, dynamo=True, verbose=False,
                                custom_translation_table=dynamo_translation_table())
    program.save(str(path), external_data=True)


def internal_names(outputs: list[str]) -> list[str]:
    """The output names the subfunction export traces with: ``*_RetainedState`` -> ``*_InternalRetainedState``
    (QEfficient's ``_setup_onnx_subfunctions``), so the layer function's outputs carry the internal names."""
    return [re.sub(r"_RetainedState$", "_InternalRetainedState", n) for n in outputs]


def public_outputs(graph: Any, outputs: list[str]) -> int:
    """Give the graph's outputs the names ``outputs`` (in order) where they lost them, as QEfficient's
    ``RenameFunctionOutputsTransform``: the legacy exporter names a function call's outputs afresh, so the
    retained-state outputs of the layer calls come out numbered, while the layer function's own outputs keep
    the ``*_InternalRetainedState`` names traced (:func:`internal_names`). The compiler pairs ``past_key.i``
    with ``past_key.i_RetainedState`` (``-retained-state``), so the graph carries the public names. Returns
    how many outputs were renamed."""
    if len(graph.output) != len(outputs):
        raise ExportError(f"the exported graph has {len(graph.output)} outputs, expected {len(outputs)}")
    renamed = {v.name: name for v, name in zip(graph.output, outputs, strict=True) if v.name != name}
    for value in graph.output:
        value.name = renamed.get(value.name, value.name)
    for node in graph.node:
        for i, name in enumerate(node.output):
            node.output[i] = renamed.get(name, name)
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    return len(renamed)


def _finish(path: Path, opset: int, vocab: int, outputs: list[str]) -> None:
    """Append the ONNX functions of the custom ops the graph uses; state ``logits`` as ``[batch_size, 1, vocab]``;
    give internal retained-state outputs their public names (:func:`public_outputs`).

    The weights are not parsed: they are copied byte for byte (``rewrite_small``)."""
    from qbuild.transforms.custom_ops import add_functions

    def edit(model: Any) -> None:
        add_functions(model, opset)
        public_outputs(model.graph, outputs)
        dims = model.graph.output[0].type.tensor_type.shape.dim  # the legacy exporter names dim 1 "Castlogits_dim_1"
        for dim, value in zip(dims, ("batch_size", 1, vocab), strict=True):
            dim.Clear()
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value

    rewrite_small(path, edit)  # external data references are kept as they are


def _describe(model: Any, exporter: str, opset: int, files: list[str]) -> dict[str, Any]:
    n = model.kv_num_layers()
    heads, head_dim = model.kv_cache_shape()
    inputs, outputs = io_names(n)
    return {"onnx": MODEL_FILE, "files": files, "inputs": inputs, "outputs": outputs, "num_layers": n,
            "num_kv_heads": heads, "head_dim": head_dim, "vocab_size": int(model.config.vocab_size),
            "exporter": exporter, "opset": opset}


@contextlib.contextmanager
def graph_form(model: Any, graph: str, dtype: str | None, sub_functions: bool = False,
               exporter: str = "legacy") -> Iterator[dict[str, Any]]:
    """The model as the ``graph`` form exports it, for the time of the block; yields what was changed.

    ``qaic``: CtxScatter/CtxGather cache ops and CustomRMSNorm norms; ``fused``: ``plain``, with the attention
    as GroupQueryAttention where the model allows (:func:`~qbuild.transforms.models.llama.fused_attention`; the
    report says which, and why not); ``plain``: a large output head as column blocks
    (:func:`~qbuild.transforms.kv_cache.head_blocks`) and, for the legacy exporter, RoPE as ONNX Runtime's
    RotaryEmbedding (:func:`~qbuild.transforms.models.llama.rope_tables`); ``dtype``: parameters and buffers
    cast to it; ``sub_functions``: the decoder layers called as modules of a swapped class (its ``classes`` go to
    ``export_modules_as_functions``) and the invalid cache index 0 (qbuild.transforms.kv_cache.layer_functions).
    Everything is put back afterwards (the model may be shared with other builds of this process; a bfloat16 ->
    float32 -> bfloat16 round trip is exact)."""
    import torch

    from qbuild.transforms.custom_ops import swapped_rmsnorm
    from qbuild.transforms.kv_cache import head_blocks, kv_ops, layer_functions
    from qbuild.transforms.models.llama import fused_attention, rope_tables, rotary_inside

    if graph not in ("plain", "qaic", "fused"):
        raise ExportError(f"unknown KV graph form {graph!r}; expected plain, fused or qaic")
    report: dict[str, Any] = {"graph": graph}
    with contextlib.ExitStack() as stack:
        if dtype is not None:
            tensors = [*model.parameters(), *model.buffers()]
            kept = [(t, t.data) for t in tensors if t.is_floating_point() and t.dtype != getattr(torch, dtype)]
            for t, data in kept:
                t.data = data.to(getattr(torch, dtype))
            stack.callback(lambda: [setattr(t, "data", data) for t, data in kept])
            report["dtype"] = dtype
        if graph == "qaic":
            report["custom_rmsnorm"] = stack.enter_context(swapped_rmsnorm(model))["swapped"]
            stack.enter_context(kv_ops(model, "qaic"))
        else:
            if (blocks := stack.enter_context(head_blocks(model))) > 1:
                report["head_blocks"] = blocks
            tables = exporter == "legacy" and stack.enter_context(rope_tables(model))
            if graph == "fused":
                why = ("the dynamo exporter cannot export it (export.exporter=legacy can)" if exporter != "legacy"
                       else stack.enter_context(fused_attention(model)))
                report["attention"] = "com.microsoft GroupQueryAttention" if why is None else f"plain: {why}"
                if why is None and tables and rotary_inside(model):
                    report["rotary"] = "inside GroupQueryAttention"
            if tables and "rotary" not in report:
                report["rotary"] = "com.microsoft RotaryEmbedding"
        if sub_functions:
            classes = stack.enter_context(layer_functions(model))
            report.update(sub_functions=sorted(c.__name__ for c in classes), invalid_index=0, classes=classes)
        yield report


def export_kv_causal_lm(model: Any, out_dir: Path, *, exporter: str, opset: int, graph: str = "plain",
                        dtype: str | None = None, sub_functions: bool = False) -> dict[str, Any]:
    """Export a ``kv_cache``-transformed ``model`` to ``out_dir/model.onnx`` (+ external data); checked.

    ``graph``: ``plain`` or ``qaic`` (QEfficient's CtxScatter/CtxGather/CustomRMSNorm form, see
    :func:`graph_form`); ``dtype``: export in this dtype instead of the model's; ``sub_functions``
    (``compile.qaic.use_onnx_subfunctions``, qaic form and legacy exporter only): every decoder layer is one
    call of a single ONNX function, as QEfficient's subfunction export (:func:`graph_form`)."""
    from qbuild.transforms.kv_cache import KVCausalLM

    if not isinstance(model, KVCausalLM):
        raise ExportError("the kv causal-LM export needs the kv_cache transform",
                          hint="add kv_cache to transforms.apply (e.g. transforms=kv_cache)")
    check_args(exporter, opset)
    if sub_functions and (exporter != "legacy" or graph != "qaic"):
        raise ExportError("compile.qaic.use_onnx_subfunctions: decoder layers are exported as ONNX functions by the "
                          f"legacy exporter in the qaic graph form only (got export.exporter={exporter}, "
                          f"graph {graph})", hint="set export.exporter=legacy, or compile.qaic.use_onnx_subfunctions"
                          "=false")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    names = io_names(model.kv_num_layers())
    before = output_files(out_dir)
    try:
        with quiet(), graph_form(model, graph, dtype, sub_functions, exporter) as form:
            wrapper, args = _wrapper(model, model.kv_num_layers()), example_inputs(model)
            if exporter == "dynamo":
                _export_dynamo(wrapper, args, path, opset, names)
            elif sub_functions:
                _export_legacy(wrapper, args, path, opset, (names[0], internal_names(names[1])), form.pop("classes"))
            else:
                _export_legacy(wrapper, args, path, opset, names)
                gather_external_data(path, output_files(out_dir) - before - {MODEL_FILE})
            _finish(path, opset, int(model.config.vocab_size), names[1])
        check_model(path)  # the graph and the weights' headers; the weights' bytes are the exporter's
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{exporter} export to {path} failed: {one_line(exc)}") from exc
    return {**_describe(model, exporter, opset, sorted(output_files(out_dir) - (before - {MODEL_FILE, DATA_FILE}))),
            "graph_form": form}


def save_tokenizer(model: Any, out: Path, p: ExportParams, ctx: StageContext) -> str:
    """Save the runtime tokenizer into ``out/tokenizer``; says what ``qbuild run`` will tokenise with."""
    from qbuild.models.tokenizer import RUNTIME_DIR, load_tokenizer, save_runtime_tokenizer

    if not isinstance(p.options, KVExport):
        return "transformers: the export was given no tokenizer"
    generation = getattr(model, "generation_config", None)
    eos = generation.eos_token_id if generation is not None else model.config.eos_token_id
    try:
        tok = load_tokenizer(ctx.tokenizer_dir(p.options.tokenizer, p.model))
        why = save_runtime_tokenizer(tok, Path(out) / RUNTIME_DIR, eos)
    except Exception as exc:  # a build without a (usable) tokenizer is fine until something tokenises
        return f"transformers: {one_line(exc)}"
    return "tokenizers" if why is None else f"transformers: {why}"


# --- verify -----------------------------------------------------------------------------------------

def reference_model(p: VerifyParams, ctx: StageContext) -> tuple[Any, Any]:
    """The tokenizer and the untransformed HF model on the same weights."""
    from qbuild.models.tokenizer import load_tokenizer

    return load_tokenizer(ctx.tokenizer_dir(p.tokenizer, p.model)), ctx.model(p.model.untransformed())


def hf_greedy(model: Any, ids: list[int], max_new_tokens: int, tokenizer: Any) -> list[int]:
    """New tokens of ``generate(do_sample=False)`` for one prompt (EOS included when reached)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return out[0, len(ids):].tolist()


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length if one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

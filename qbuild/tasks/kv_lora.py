"""Several LoRA adapters served from one KV causal-LM program (QEfficient's ``QEffAutoLoraModelForCausalLM``).

The retained-state KV task (qbuild.tasks.kv_causal_lm) with one more input, ``lora_ids`` int64
``[batch_size, 1]``: id 0 is the base model (zero LoRA weights), ids 1..n the adapters of ``model.adapters``
in the manifest's order. Every Linear an adapter targets becomes a :func:`multi_lora_linear` module holding
the stacked weights of all adapters, ``A [n+1, in, r]``, ``B [n+1, r, out]`` and ``scaling [n+1]``; each
batch row gathers its adapter's by ``lora_ids`` (a plain ONNX ``Gather``, in both graph forms: QEfficient
uses ``CtxGatherCB`` there, which qbuild's custom ops do not have) and adds ``scaling * (x @ A) @ B`` to the
base output, peft's ``lora_B(lora_A(x)) * scaling``. Every adapter is compiled into the program as
weights; nothing is bound at run time but the ids.

Verify: one mixed batch, every verify prompt with every adapter and with the base, must give the greedy
tokens of peft's ``PeftModel`` (that adapter active, or ``disable_adapter()``) ``generate(do_sample=False)``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import ExportError, LoadError, VerifyError, one_line
from qbuild.manifest.adapters import BASE, WEIGHT_FILES, adapter_names
from qbuild.manifest.schema import Manifest
from qbuild.tasks.export_common import (
    DATA_FILE,
    MODEL_FILE,
    check_args,
    check_model,
    gather_external_data,
    legacy_export,
    output_files,
    quiet,
)
from qbuild.tasks.kv_causal_lm import (
    KVCausalLMTask,
    KVExport,
    KVVerify,
    _axes,
    _describe,
    _finish,
    example_inputs,
    first_difference,
    graph_form,
    hf_greedy,
    io_names,
    save_tokenizer,
)

if TYPE_CHECKING:
    from qbuild.runtime import Artifact
    from qbuild.stages.base import StageContext
    from qbuild.stages.export import ExportParams
    from qbuild.stages.verify import VerifyParams

_PREFIX, _A, _B = "base_model.model.", ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class KVLoraExport(KVExport):
    adapters: tuple[str, ...] = ()  # names in id order (1..n); their weights are keyed by the adapters stage


@dataclass(frozen=True)
class KVLoraVerify(KVVerify):
    adapters: tuple[str, ...] = ()


class KVLoraTask(KVCausalLMTask):
    """``causal_lm_kv`` with ``model.adapters``: the same graph plus ``lora_ids`` and the stacked adapters."""

    code = (*KVCausalLMTask.code, "tasks/kv_lora.py", "manifest/adapters.py")

    def export_options(self, m: Manifest) -> KVLoraExport:
        base = super().export_options(m)
        return KVLoraExport(base.tokenizer, base.graph, base.dtype, base.sub_functions, adapter_names(m))

    def export(self, model: Any, out: Path, p: ExportParams, ctx: StageContext) -> dict[str, Any]:
        o: KVLoraExport = p.options
        directory = ctx.inputs["adapters"].out
        info = export_kv_lora(model, out, [directory / n for n in o.adapters], exporter=p.exporter, opset=p.opset,
                              graph=o.graph, dtype=o.dtype)
        (out / "adapters.json").write_text((directory / "adapters.json").read_text())  # the runtime's name -> id
        return {**info, "runtime_tokenizer": save_tokenizer(model, out, p, ctx)}

    def verify_options(self, m: Manifest) -> KVLoraVerify:
        v = m.verify
        return KVLoraVerify(tuple(v.prompts), v.max_new_tokens, tuple(m.seq.lengths), m.seq.ctx_len,
                            adapter_names(m))

    def verify(self, p: VerifyParams, ctx: StageContext, artifact: Artifact) -> dict[str, Any]:
        """One mixed batch (every prompt x base and every adapter) vs peft's greedy tokens, row by row."""
        from qbuild.models.tokenizer import load_tokenizer

        o: KVLoraVerify = p.check
        tokenizer = load_tokenizer(ctx.tokenizer_dir(p.tokenizer, p.model))
        prompts = [tokenizer(x)["input_ids"] for x in o.prompts]
        names = [BASE, *o.adapters]
        ctx.progress(f"peft generate: {len(prompts)} prompts x {len(names)} adapters", None)
        expected, eos = peft_greedy(ctx.model_dir(p.model), p.model.dtype, ctx.inputs["adapters"].out, o, prompts,
                                    tokenizer)
        rows = [(aid, j) for aid in range(len(names)) for j in range(len(prompts))]
        ctx.progress(f"generate with the compiled artifact ({artifact.backend}): one batch of {len(rows)}", None)
        runtime = artifact.kv_runtime(ctx_len=o.ctx_len, buckets=o.lengths)
        got = runtime.generate([prompts[j] for _, j in rows], o.max_new_tokens, eos,
                               lora_ids=[aid for aid, _ in rows]).tokens
        for (aid, j), have in zip(rows, got, strict=True):
            want = expected[aid][j]
            if want != have:
                at = first_difference(want, have)
                raise VerifyError(f"adapter {names[aid]!r} (lora_ids {aid}): greedy tokens differ from peft generate "
                                  f"for prompt {o.prompts[j]!r} at new token {at}: expected {want[at:at + 4]}..., "
                                  f"got {have[at:at + 4]}...", hint="compare `qbuild run --adapter NAME` with "
                                  "PeftModel.generate on the same adapter")
        return {"prompts": list(o.prompts), "max_new_tokens": o.max_new_tokens, "adapters": names,
                "tokens": {n: expected[i] for i, n in enumerate(names)}, "mixed_batch_rows": len(rows),
                "prompt_tokens": [len(x) for x in prompts], "buckets": runtime.buckets}


# --- adapter files ----------------------------------------------------------------------------------


def load_adapter_weights(directory: Path) -> dict[str, Any]:
    """The tensors of a peft adapter directory (safetensors, else a torch ``.bin``), by peft's saved names."""
    import torch

    path = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if path is None:
        raise LoadError(f"{directory}: no adapter weights ({' or '.join(WEIGHT_FILES)})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def adapter_summary(name: str, directory: Path) -> dict[str, Any]:
    """Name, r, alpha, scaling (peft's: alpha / r, or alpha / sqrt(r) with rsLoRA) and targets of an adapter."""
    config = json.loads((directory / "adapter_config.json").read_text())
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return {"name": name, "r": r, "alpha": alpha, "scaling": scaling,
            "target_modules": sorted(config["target_modules"])}


def _targets(model: Any, targets: tuple[str, ...]) -> list[tuple[str, Any]]:
    """The Linear modules peft wraps for ``targets`` (a module name equal to or ending in ``.target``)."""
    import torch

    return [(n, mod) for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
            and any(n == t or n.endswith("." + t) for t in targets)]


def write_random_adapter(model: Any, out: Path, *, r: int, alpha: float, targets: tuple[str, ...], seed: int) -> None:
    """A peft adapter directory with seeded random A ``[r, in]`` (std 1/sqrt(in)) and B ``[out, r]`` (std: the
    model's initializer range): non-zero, so each adapter changes the model's tokens."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    modules = _targets(model, targets)
    if not modules:
        raise LoadError(f"model.lora.target_modules: {list(targets)} matches no Linear module of "
                        f"{type(model).__name__}", hint="name Linear modules of the model, e.g. [q_proj, v_proj]")
    gen = torch.Generator().manual_seed(seed)
    std_b = float(getattr(model.config, "initializer_range", 0.02))
    tensors = {}
    for name, mod in modules:
        tensors[f"{_PREFIX}{name}{_A}"] = torch.randn(r, mod.in_features, generator=gen) / math.sqrt(mod.in_features)
        tensors[f"{_PREFIX}{name}{_B}"] = torch.randn(mod.out_features, r, generator=gen) * std_b
    out.mkdir(parents=True)
    LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
               task_type="CAUSAL_LM").save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"))


def check_against_base(model: Any, key: str, directory: Path, source: Path) -> None:
    """Every tensor of the adapter names a Linear of the base model and fits its shape (else: another base)."""
    import torch

    weights = load_adapter_weights(directory)
    r = adapter_summary(directory.name, directory)["r"]
    where = f"{key}: {source}"
    for key, t in weights.items():
        module, kind = _split_key(key)
        if kind is None:
            raise LoadError(f"{where}: {key} is not a LoRA A/B weight; only plain LoRA adapters are served")
        try:
            mod = model.get_submodule(module)
        except AttributeError:
            mod = None
        if not isinstance(mod, torch.nn.Linear):
            raise LoadError(f"{where}: {key} names {module}, which is not a Linear module of the base model "
                            f"({type(model).__name__})", hint="the adapter was trained on another base model")
        want = (r, mod.in_features) if kind == "A" else (mod.out_features, r)
        if tuple(t.shape) != want:
            raise LoadError(f"{where}: {key} has shape {list(t.shape)}, the base model's {module} needs "
                            f"{list(want)}", hint="the adapter was trained on another base model")


def _split_key(key: str) -> tuple[str, str | None]:
    body = key.removeprefix(_PREFIX)
    for suffix, kind in ((_A, "A"), (_B, "B")):
        if body.endswith(suffix):
            return body[: -len(suffix)], kind
    return body, None


# --- the multi-LoRA rewrite -------------------------------------------------------------------------


class LoraIds:
    """The ``lora_ids [B, 1]`` of the forward being run, read by every multi-LoRA module."""

    ids: Any = None


@cache
def multi_lora_linear() -> type:
    """The module class (defined on first use: torch is imported here, not at plan time)."""
    import torch

    class MultiLoraLinear(torch.nn.Module):
        """``base(x) + scaling[id] * (x @ A[id]) @ B[id]`` per batch row, ``id = lora_ids[row, 0]``."""

        def __init__(self, base: Any, a: Any, b: Any, scaling: Any, holder: LoraIds) -> None:
            super().__init__()
            self.base, self.holder = base, holder
            self.register_buffer("lora_a", a)  # [n+1, in, r]
            self.register_buffer("lora_b", b)  # [n+1, r, out]
            self.register_buffer("lora_scaling", scaling)  # [n+1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, in]
            ids = self.holder.ids.reshape(-1)  # [B]
            a = self.lora_a.index_select(0, ids)  # [B, in, r]: Gather
            b = self.lora_b.index_select(0, ids)  # [B, r, out]
            s = self.lora_scaling.index_select(0, ids).reshape(-1, 1, 1)  # [B, 1, 1]
            return self.base(x) + torch.matmul(torch.matmul(x, a), b) * s  # [B, S, out]

    return MultiLoraLinear


def _stacked(base: Any, key: str, adapters: list[tuple[dict[str, Any], float]]) -> tuple[Any, Any, Any]:
    """``A [n+1, in, r]``, ``B [n+1, r, out]``, ``scaling [n+1]`` of one module (zeros: base, or not targeted)."""
    import torch

    r = next(w[key + _A].shape[0] for w, _ in adapters if key + _A in w)
    dtype = base.weight.dtype
    a = torch.zeros(len(adapters) + 1, base.in_features, r, dtype=dtype)
    b = torch.zeros(len(adapters) + 1, r, base.out_features, dtype=dtype)
    s = torch.zeros(len(adapters) + 1, dtype=dtype)
    for i, (w, scaling) in enumerate(adapters, 1):
        if key + _A in w:
            a[i], b[i], s[i] = w[key + _A].T.to(dtype), w[key + _B].T.to(dtype), scaling
    return a, b, s


@contextlib.contextmanager
def multi_lora(model: Any, directories: list[Path]) -> Iterator[LoraIds]:
    """``model`` with every adapter-targeted Linear swapped for a multi-LoRA module over ``directories`` (ids
    1..n) for the time of the block; yields the holder its forward sets ``lora_ids`` on."""
    holder = LoraIds()
    adapters = [(load_adapter_weights(d), adapter_summary(d.name, d)["scaling"]) for d in directories]
    modules = sorted({_split_key(k)[0] for w, _ in adapters for k in w})
    cls, swapped = multi_lora_linear(), []
    try:
        for name in modules:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, attr)
            setattr(parent, attr, cls(base, *_stacked(base, _PREFIX + name, adapters), holder))
            swapped.append((parent, attr, base))
        yield holder
    finally:
        for parent, attr, base in swapped:
            setattr(parent, attr, base)
        holder.ids = None


def _lora_wrapper(model: Any, num_layers: int, holder: LoraIds) -> Any:
    """A module ``forward(input_ids, position_ids, lora_ids, past_key_0, ...)`` that hands ``lora_ids`` to the
    multi-LoRA modules, then runs the KV model."""
    import torch

    args = ", ".join(f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value"))
    namespace: dict[str, Any] = {}
    exec(  # noqa: S102 - generated signature only; the body forwards to the model
        f"def forward(self, input_ids, position_ids, lora_ids, {args}):\n"
        f"    self.holder.ids = lora_ids\n"
        f"    return self.inner(input_ids, position_ids, {args})\n",
        namespace,
    )
    wrapper = type("KVLoraExportWrapper", (torch.nn.Module,), {"forward": namespace["forward"]})()
    wrapper.inner, wrapper.holder = model, holder
    return wrapper.eval()


def export_kv_lora(model: Any, out_dir: Path, directories: list[Path], *, exporter: str, opset: int,
                   graph: str = "plain", dtype: str | None = None) -> dict[str, Any]:
    """Export the KV model with the adapters in ``directories`` (ids 1..n) and the ``lora_ids`` input."""
    import torch

    from qbuild.transforms.kv_cache import KVCausalLM

    if not isinstance(model, KVCausalLM):
        raise ExportError("the multi-LoRA export needs the kv_cache transform", hint="add transforms=kv_cache")
    check_args(exporter, opset)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, n = out_dir / MODEL_FILE, model.kv_num_layers()
    inputs, outputs = io_names(n)
    names = [*inputs[:2], "lora_ids", *inputs[2:]]
    before = output_files(out_dir)
    try:
        with quiet(), multi_lora(model, directories) as holder, graph_form(model, graph, dtype) as form:
            args = example_inputs(model)
            lora_ids = torch.tensor([[1], [len(directories)]], dtype=torch.int64)  # batch 2, two adapters
            legacy_export(_lora_wrapper(model, n, holder), (*args[:2], lora_ids, *args[2:]), path,
                          input_names=names, output_names=outputs, opset_version=opset, do_constant_folding=True,
                          dynamic_axes={**_axes(inputs, outputs), "lora_ids": {0: "batch_size"}})
            gather_external_data(path, output_files(out_dir) - before - {MODEL_FILE})
            _finish(path, opset, int(model.config.vocab_size), outputs)
        check_model(path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"multi-LoRA export to {path} failed: {one_line(exc)}") from exc
    files = sorted(output_files(out_dir) - (before - {MODEL_FILE, DATA_FILE}))
    return {**_describe(model, exporter, opset, files), "inputs": names, "graph_form": form,
            "adapters": [d.name for d in directories]}


# --- the peft reference -----------------------------------------------------------------------------


def peft_greedy(model_dir: Path, dtype: str, adapters_dir: Path, o: KVLoraVerify, prompts: list[list[int]],
                tokenizer: Any) -> tuple[list[list[list[int]]], Any]:
    """peft's greedy tokens per adapter id (0: ``disable_adapter()``) and prompt, and the EOS ids."""
    import warnings

    from peft import PeftModel

    from qbuild.models.source import load_model

    base = load_model(model_dir, "causal_lm", dtype)
    eos = base.generation_config.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(base, str(adapters_dir / o.adapters[0]), adapter_name=o.adapters[0])
        for name in o.adapters[1:]:
            peft.load_adapter(str(adapters_dir / name), adapter_name=name)
    peft.eval()
    out = []
    with peft.disable_adapter():
        out.append([hf_greedy(peft, ids, o.max_new_tokens, tokenizer) for ids in prompts])
    for name in o.adapters:
        peft.set_adapter(name)
        out.append([hf_greedy(peft, ids, o.max_new_tokens, tokenizer) for ids in prompts])
    return out, eos


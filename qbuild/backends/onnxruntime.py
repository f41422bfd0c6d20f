"""The ONNX Runtime backend (runs everywhere; what the tests execute): an offline-optimised
``model.onnx`` plus the ``session.json`` to open it.

Specialisations (concrete values of the graph's symbolic dims, e.g. one per sequence-length bucket)
run either in fixed-shape sessions (one per specialisation, free-dimension overrides) or in one dynamic
session. ``compile.onnxruntime.session: auto`` measures both on the task's sample inputs and records
the choice in ``session.json`` (the timings and reason in the compile record's meta);
:func:`open_sessions` opens what was chosen.

ORT_ENABLE_ALL (and ORT_ENABLE_LAYOUT) can write hardware-specific layouts into a saved model, so the
saved model is optimised at most at "extended"; with ``compile.onnxruntime.graph_optimization: all``
the remaining, layout-level optimisations run online when the artifact is opened
(``runtime_optimization``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.backends import Backend, ort_quantize
from qbuild.errors import CompileError, RunError, one_line
from qbuild.manifest.schema import Manifest
from qbuild.runtime.onnxruntime import (
    DATA_FILE,
    DISABLED_OPTIMIZERS,
    MODEL_FILE,
    PROVIDERS,
    SESSION_FILE,
    OrtArtifact,
    open_model_session,
    session_options,
)

if TYPE_CHECKING:
    from qbuild.runtime import Artifact
    from qbuild.stages.base import StageContext
    from qbuild.store import StatCache
    from qbuild.tasks import Task

#: initializers at least this large go to DATA_FILE (keeps the protobuf under its 2 GiB limit)
EXTERNAL_MIN_BYTES = 1024
#: requested level -> (level the saved model is optimised at, level applied when it is opened)
_PLAN = {"basic": ("basic", "disabled"), "extended": ("extended", "disabled"), "all": ("extended", "all")}
SESSION_MODES = ("auto", "fixed", "dynamic")
#: auto picks fixed-shape sessions only when they are at least this much faster in total
FIXED_MIN_GAIN = 0.05
#: per specialisation: timed runs of each kind, at least _MIN_RUNS and _MIN_SECONDS, at most _MAX_RUNS and
#: _MAX_SECONDS (then at least 2 runs): a few seconds for MiniLM on a busy 2-core machine
_MIN_RUNS, _MAX_RUNS, _MIN_SECONDS, _MAX_SECONDS = 3, 50, 0.2, 1.5

SampleInputs = Callable[[Mapping[str, int]], "Mapping[str, Any] | None"]


def _io(args: list[Any]) -> list[dict[str, Any]]:
    return [{"name": a.name, "type": a.type, "shape": [str(d) for d in a.shape]} for a in args]


def _check_compile_args(onnx_path: Path, out_dir: Path, graph_optimization: str, session: str) -> None:
    if graph_optimization not in _PLAN:
        raise CompileError(f"compile.onnxruntime.graph_optimization: unknown level {graph_optimization!r} "
                           f"for {onnx_path}")
    if session not in SESSION_MODES:
        raise CompileError(f"compile.onnxruntime.session: unknown mode {session!r}; "
                           f"expected one of {list(SESSION_MODES)}")
    if not onnx_path.is_file():
        raise CompileError(f"ONNX file {onnx_path} does not exist")
    if (out_dir / MODEL_FILE).resolve() == onnx_path.resolve():
        raise CompileError(f"cannot compile {onnx_path} onto itself; use another output directory")


def compile_onnx(onnx_path: Path, out_dir: Path, *, num_cores: int, graph_optimization: str,
                 specializations: list[dict[str, Any]] | None = None, session: str = "auto",
                 sample_inputs: SampleInputs | None = None) -> dict[str, Any]:
    """Optimise ``onnx_path`` offline into ``out_dir/model.onnx`` (+ ``.data``) and write ``session.json``.

    ``session.json`` records the graph's ``kv_attention`` form for the runtime (:func:`kv_attention`;
    ``group_query``: the KV caches are written in place by GroupQueryAttention, under its padding contract,
    qbuild.transforms.models.llama.gqa_slots).
    With ``specializations`` (``[{"name", "symbols": {dim: int}}]``), ``session`` chooses fixed-shape
    sessions or one dynamic session; ``auto`` measures both on ``sample_inputs(symbols)``.
    """
    import onnxruntime as ort

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    _check_compile_args(onnx_path, out_dir, graph_optimization, session)
    target = out_dir / MODEL_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    saved, runtime = _PLAN[graph_optimization]
    so = session_options(saved, num_cores)
    so.optimized_model_filepath = str(target)
    # the optimiser only writes the graph: prepacking the weights for the CPU kernels (a second copy of every
    # MatMul weight) would be thrown away; without it the external data stays memory-mapped and untouched
    # (125M Llama: 0.5 -> 0.1 GB and 1.9 -> 0.7 s; the written model is byte-identical)
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_MIN_BYTES)
    )
    try:
        optimiser = ort.InferenceSession(str(onnx_path), so, providers=PROVIDERS,
                                         disabled_optimizers=DISABLED_OPTIMIZERS)
    except Exception as exc:
        raise CompileError(f"ONNX Runtime could not compile {onnx_path}: {one_line(exc)}",
                           hint=_dtype_hint(onnx_path)) from exc
    form = kv_attention(onnx_path)  # read once ONNX Runtime has parsed the file: a corrupt one fails above
    info = {
        "backend": "onnxruntime",
        "onnxruntime": ort.__version__,
        "providers": optimiser.get_providers(),
        "intra_op_num_threads": num_cores,
        "inter_op_num_threads": 1,
        "graph_optimization": graph_optimization,
        "saved_optimization": saved,
        "runtime_optimization": runtime,
        "inputs": _io(optimiser.get_inputs()),
        "outputs": _io(optimiser.get_outputs()),
        "specializations": list(specializations or []),
        **({"kv_attention": form} if form else {}),
    }
    del optimiser
    info["session"] = choose_session(target, info, session, sample_inputs)
    # the artifact holds the choice; the measurement behind it (timings vary run to run) goes only into the
    # compile record's meta, so a rebuild (--cache=redo) of the same choice gives the same bytes
    on_disk = {**info, "session": {k: info["session"][k] for k in ("mode", "requested")}}
    (out_dir / SESSION_FILE).write_text(json.dumps(on_disk, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return {**info, "files": files}


def kv_attention(onnx_path: Path) -> str | None:
    """``group_query`` when the graph's retained-state KV caches are written by ONNX Runtime's GroupQueryAttention
    (the runtime then binds them in place and keeps to its padding contract), else None. Read from the graph
    itself, not from the export's report: the runtime's binding must follow what the graph does."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    gqa = {out for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"
           for out in n.output}
    if not gqa:
        return None
    retained = [o.name for o in model.graph.output if o.name.endswith("_RetainedState")]
    others = [name for name in retained if name not in gqa]
    if not retained or others:
        why = (f"{', '.join(others[:3])} not written by it" if others else "no retained-state outputs")
        raise CompileError(f"{onnx_path}: GroupQueryAttention in a graph whose KV caches the runtime cannot bind in "
                           f"place ({why}): the caches must all be GroupQueryAttention's outputs or none")
    return "group_query"


def _dtype_hint(onnx_path: Path) -> str | None:
    """A hint when the graph takes bfloat16 tensors, which ONNX Runtime's CPU kernels mostly cannot run."""
    try:
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - a hint only; the compile error stands on its own
        return None
    if any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in graph.input):
        return ("the graph is bfloat16, which ONNX Runtime's CPU kernels do not run: set model.dtype=float32 "
                "(or float16) for compile.backend=onnxruntime")
    return None


# --- fixed-shape sessions vs one dynamic session --------------------------------------------------


def choose_session(model: Path, info: Mapping[str, Any], requested: str,
                   sample_inputs: SampleInputs | None) -> dict[str, Any]:
    """``{"mode": "fixed" | "dynamic", "requested", "reason", ...timings}`` for ``session.json``."""
    specs = info.get("specializations") or []
    choice: dict[str, Any] = {"requested": requested}
    if not specs:
        return {**choice, "mode": "dynamic", "reason": "no specialisations"}
    if requested != "auto":
        return {**choice, "mode": requested, "reason": f"compile.onnxruntime.session: {requested}"}
    feeds = [(sample_inputs(s["symbols"]) if sample_inputs else None) or generic_feed(info["inputs"], s["symbols"])
             for s in specs]
    if any(f is None for f in feeds):
        return {**choice, "mode": "dynamic", "reason": "the task gives no sample inputs to measure with"}
    try:
        rows = _measure(model, info, specs, feeds)  # type: ignore[arg-type]
    except (CompileError, RunError) as exc:
        return {**choice, "mode": "dynamic", "reason": f"a fixed-shape session failed: {exc.message}"[:300]}
    fixed, dynamic = sum(r["fixed_ms"] for r in rows), sum(r["dynamic_ms"] for r in rows)
    mode = "fixed" if fixed < dynamic * (1 - FIXED_MIN_GAIN) else "dynamic"
    why = (f"measured: fixed {fixed:.3f} ms vs dynamic {dynamic:.3f} ms over {len(rows)} specialisations; "
           f"fixed needs a gain of at least {FIXED_MIN_GAIN:.0%}")
    return {**choice, "mode": mode, "reason": why, "fixed_ms": round(fixed, 4), "dynamic_ms": round(dynamic, 4),
            "timings": rows}


def graph_inputs(onnx_path: Path) -> list[dict[str, Any]]:
    """The graph inputs of ``onnx_path`` as ``session.json`` lists them: name, type, shape (symbolic dims by name)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    out = []
    for i in graph.input:
        if i.name in weights:
            continue
        t = i.type.tensor_type
        kind = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        kind = {"float32": "float", "float16": "float16", "int64": "int64", "int32": "int32"}.get(kind, kind)
        out.append({"name": i.name, "type": f"tensor({kind})",
                    "shape": [d.dim_param or str(d.dim_value) for d in t.shape.dim]})
    return out


def generic_feed(inputs: list[dict[str, Any]], symbols: Mapping[str, int]) -> dict[str, Any] | None:
    """Inputs of the specialisation's shapes when the task gives none: zeros, and positions 0..n-1 (None when a
    dim has no value in ``symbols`` or an input type is not int64 / float / float16)."""
    import numpy as np

    types = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(float16)": np.float16}
    feed = {}
    for i in inputs:
        shape = [int(d) if d.isdigit() else symbols.get(d) for d in i["shape"]]
        if any(d is None for d in shape) or i["type"] not in types:
            return None
        value = np.zeros(shape, types[i["type"]])
        if i["name"] == "position_ids":
            value[...] = np.arange(shape[-1])
        feed[i["name"]] = value
    return feed


def _measure(model: Path, info: Mapping[str, Any], specs: list[dict[str, Any]],
             feeds: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Median ms per run of a fixed-shape and the dynamic session, per specialisation.

    One session is open at a time (each holds its own prepacked copy of the weights: two at once doubled the
    compile stage's peak memory); the dynamic session runs every specialisation first, then each fixed one."""
    times: dict[str, dict[str, list[float]]] = {s["name"]: {} for s in specs}
    dynamic = open_model_session(model, info)
    for spec, feed in zip(specs, feeds, strict=True):
        times[spec["name"]]["dynamic"] = _time_runs(dynamic, feed, spec["name"])
    del dynamic  # freed here: an InferenceSession holds no reference cycle (checked), no gc.collect needed
    for spec, feed in zip(specs, feeds, strict=True):
        fixed = open_model_session(model, info, overrides=spec["symbols"])
        times[spec["name"]]["fixed"] = _time_runs(fixed, feed, spec["name"])
        del fixed
    return [{"name": s["name"], "symbols": dict(s["symbols"]), "runs": len(times[s["name"]]["fixed"]),
             **{f"{k}_ms": round(sorted(v)[len(v) // 2], 4) for k, v in sorted(times[s["name"]].items())}}
            for s in specs]


def _time_runs(session: Any, feed: Mapping[str, Any], name: str) -> list[float]:
    """ms per run of ``session`` on ``feed``, after one warm-up run (``_more`` decides how many)."""
    out: list[float] = []
    try:
        session.run(None, dict(feed))
        start = time.perf_counter()
        while _more(len(out), time.perf_counter() - start):
            t0 = time.perf_counter()
            session.run(None, dict(feed))
            out.append((time.perf_counter() - t0) * 1e3)
    except Exception as exc:
        raise CompileError(f"{name}: {one_line(exc)}") from exc
    return out


def _more(runs: int, elapsed: float) -> bool:
    if runs < 2:
        return True
    if runs >= _MAX_RUNS or elapsed >= _MAX_SECONDS:
        return False
    return runs < _MIN_RUNS or elapsed < _MIN_SECONDS




# --- the Backend contract ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OrtOptions:
    """What an ONNX Runtime compile runs on (``compile.onnxruntime``, the task's specialisations)."""

    threads: int
    graph_optimization: str
    session: str
    quantize: str
    specializations: tuple[dict[str, Any], ...]
    task: str
    quantize_min_cosine: float | None = None


class OrtBackend(Backend):
    name = "onnxruntime"
    tools = ("onnx", "onnxruntime")
    code = ("backends/onnxruntime.py", "backends/ort_quantize.py", "runtime/onnxruntime.py")

    def resolve(self, m: Manifest, task: Task, stats: StatCache) -> OrtOptions:
        c = m.compile.onnxruntime
        return OrtOptions(c.threads, c.graph_optimization, c.session, c.quantize, tuple(task.specializations(m)),
                          task.name, c.quantize_min_cosine if c.quantize != "none" else None)

    def inexact(self, o: OrtOptions) -> str | None:
        if o.quantize == "none":
            return None
        return (f"compile.onnxruntime.quantize={o.quantize} (quantised outputs differ from PyTorch by design; "
                "measure accuracy on real weights)")

    def describe(self, o: OrtOptions, onnx: Path | None = None) -> list[str]:
        lines = [f"onnxruntime: CPUExecutionProvider, {o.threads} threads, {o.graph_optimization} "
                 "graph optimisation, saved offline"]
        if o.quantize != "none":
            kind = {"int8": "dynamic int8 (MatMulInteger, per-tensor activations)",
                    "int8_block": "int8 MatMulNBits, block 32 (float32 models: int8 activations per block)",
                    "int4": "int4 MatMulNBits, block 32 (float32 models: int8 activations per block; a causal "
                            "LM's output head in int8 blocks)"}[o.quantize]
            lines.append(f"onnxruntime: weights quantised to {kind} before optimisation")
            if o.quantize_min_cosine is not None:
                lines.append(f"onnxruntime: the most sensitive MatMuls kept in fp32 (measured one by one) until the "
                             f"minimum output cosine to fp32 reaches {o.quantize_min_cosine}")
        if o.specializations:
            how = {"auto": "fixed-shape or dynamic sessions, chosen by measurement",
                   "fixed": "one fixed-shape session each", "dynamic": "one dynamic session"}[o.session]
            names = ", ".join(f"{s['name']} {s['symbols']}" for s in o.specializations)
            lines.append(f"onnxruntime: {len(o.specializations)} specialisations ({names}): {how}")
        return lines

    def compile(self, o: OrtOptions, onnx: Path, export: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
        from qbuild.tasks import get_task

        task, vocab = get_task(o.task), int(export.get("vocab_size") or 1000)
        specs = [dict(s) for s in o.specializations]
        with tempfile.TemporaryDirectory(dir=ctx.out.parent) as tmp:
            quant: dict[str, Any] = {}
            if o.quantize != "none":
                ctx.progress(f"quantising weights ({o.quantize})", None)
                calibration = (task.calibration_inputs(specs, vocab, graph_inputs=graph_inputs(onnx))
                               if o.quantize_min_cosine is not None else [])
                quant = ort_quantize.quantize(onnx, Path(tmp) / "model.onnx", o.quantize,
                                              min_cosine=o.quantize_min_cosine, calibration=calibration,
                                              optimization=o.graph_optimization)
                onnx = Path(tmp) / "model.onnx"
            ctx.progress("optimising with ONNX Runtime", None)
            if specs and o.session == "auto":
                ctx.progress(f"measuring fixed-shape vs dynamic sessions on {len(specs)} specialisations", None)
            info = compile_onnx(onnx, ctx.out, num_cores=o.threads, graph_optimization=o.graph_optimization,
                                specializations=specs, session=o.session,
                                sample_inputs=lambda symbols: task.sample_inputs(dict(symbols), vocab))
        return {**info, **({"quantization": quant} if quant else {})}

    def open(self, directory: Path, *, threads: int | None = None) -> Artifact:
        return OrtArtifact(directory, threads)

"""The ONNX Runtime backend: an offline-optimised ``model.onnx`` plus the ``session.json`` to open it.

Specialisations (concrete values of the graph's symbolic dims, e.g. one per sequence-length bucket)
run either in fixed-shape sessions (one per specialisation, free-dimension overrides) or in one dynamic
session. ``compile.session: auto`` measures both on the task's sample inputs and records the choice
and the timings in ``session.json``; :func:`open_sessions` opens what was chosen.

ORT_ENABLE_ALL (and ORT_ENABLE_LAYOUT) can write hardware-specific layouts into a saved model, so the
saved model is optimised at most at "extended"; with ``graph_optimization: all`` the remaining,
layout-level optimisations run online when the artifact is opened (``runtime_optimization``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import CompileError

if TYPE_CHECKING:
    import onnxruntime

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SESSION_FILE = "session.json"
PROVIDERS = ["CPUExecutionProvider"]
#: initializers at least this large go to DATA_FILE (keeps the protobuf under its 2 GiB limit)
EXTERNAL_MIN_BYTES = 1024
_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
#: requested level -> (level the saved model is optimised at, level applied when it is opened)
_PLAN = {"basic": ("basic", "disabled"), "extended": ("extended", "disabled"), "all": ("extended", "all")}
SESSION_MODES = ("auto", "fixed", "dynamic")
#: auto picks fixed-shape sessions only when they are at least this much faster in total
FIXED_MIN_GAIN = 0.05
#: per specialisation: timed runs of each kind, at least _MIN_RUNS and _MIN_SECONDS, at most _MAX_RUNS and
#: _MAX_SECONDS (then at least 2 runs): a few seconds for MiniLM on a busy 2-core machine
_MIN_RUNS, _MAX_RUNS, _MIN_SECONDS, _MAX_SECONDS = 3, 50, 0.2, 1.5

SampleInputs = Callable[[Mapping[str, int]], "Mapping[str, Any] | None"]


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception (with the next line when the first ends in a colon)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else "".join(lines[:1])
    return f"{type(exc).__name__}: {text}"[:300]


def _options(level: str, intra: int) -> onnxruntime.SessionOptions:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.log_severity_level = 3  # errors only
    return so


def _io(args: list[Any]) -> list[dict[str, Any]]:
    return [{"name": a.name, "type": a.type, "shape": [str(d) for d in a.shape]} for a in args]


def _check_compile_args(onnx_path: Path, out_dir: Path, graph_optimization: str, session: str) -> None:
    if graph_optimization not in _PLAN:
        raise CompileError(f"compile.graph_optimization: unknown level {graph_optimization!r} for {onnx_path}")
    if session not in SESSION_MODES:
        raise CompileError(f"compile.session: unknown mode {session!r}; expected one of {list(SESSION_MODES)}")
    if not onnx_path.is_file():
        raise CompileError(f"ONNX file {onnx_path} does not exist")
    if (out_dir / MODEL_FILE).resolve() == onnx_path.resolve():
        raise CompileError(f"cannot compile {onnx_path} onto itself; use another output directory")


def compile_onnx(onnx_path: Path, out_dir: Path, *, num_cores: int, graph_optimization: str,
                 specializations: list[dict[str, Any]] | None = None, session: str = "auto",
                 sample_inputs: SampleInputs | None = None) -> dict[str, Any]:
    """Optimise ``onnx_path`` offline into ``out_dir/model.onnx`` (+ ``.data``) and write ``session.json``.

    With ``specializations`` (``[{"name", "symbols": {dim: int}}]``), ``session`` chooses fixed-shape
    sessions or one dynamic session; ``auto`` measures both on ``sample_inputs(symbols)``.
    """
    import onnxruntime as ort

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    _check_compile_args(onnx_path, out_dir, graph_optimization, session)
    target = out_dir / MODEL_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    saved, runtime = _PLAN[graph_optimization]
    so = _options(saved, num_cores)
    so.optimized_model_filepath = str(target)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_MIN_BYTES)
    )
    try:
        optimiser = ort.InferenceSession(str(onnx_path), so, providers=PROVIDERS)
    except Exception as exc:
        raise CompileError(f"ONNX Runtime could not compile {onnx_path}: {_one_line(exc)}") from exc
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
    }
    del optimiser
    info["session"] = choose_session(target, info, session, sample_inputs)
    (out_dir / SESSION_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return {**info, "files": files}


# --- fixed-shape sessions vs one dynamic session --------------------------------------------------


def _open(model: Path, info: Mapping[str, Any], threads: int | None = None,
          overrides: Mapping[str, int] | None = None) -> onnxruntime.InferenceSession:
    """A session on ``model`` with the recorded settings; ``overrides`` fix symbolic dims by name."""
    import onnxruntime as ort

    n = threads if threads is not None else int(info.get("intra_op_num_threads", 0))
    so = _options(info.get("runtime_optimization", "disabled"), n)
    for dim, value in (overrides or {}).items():
        so.add_free_dimension_override_by_name(dim, int(value))
    try:
        return ort.InferenceSession(str(model), so, providers=info.get("providers", PROVIDERS))
    except Exception as exc:
        raise CompileError(f"ONNX Runtime could not open {model}: {_one_line(exc)}") from exc


def choose_session(model: Path, info: Mapping[str, Any], requested: str,
                   sample_inputs: SampleInputs | None) -> dict[str, Any]:
    """``{"mode": "fixed" | "dynamic", "requested", "reason", ...timings}`` for ``session.json``."""
    specs = info.get("specializations") or []
    choice: dict[str, Any] = {"requested": requested}
    if not specs:
        return {**choice, "mode": "dynamic", "reason": "no specialisations"}
    if requested != "auto":
        return {**choice, "mode": requested, "reason": f"compile.session: {requested}"}
    feeds = [(sample_inputs(s["symbols"]) if sample_inputs else None) or _generic_feed(info["inputs"], s["symbols"])
             for s in specs]
    if any(f is None for f in feeds):
        return {**choice, "mode": "dynamic", "reason": "the task gives no sample inputs to measure with"}
    try:
        rows = _measure(model, info, specs, feeds)  # type: ignore[arg-type]
    except CompileError as exc:
        return {**choice, "mode": "dynamic", "reason": f"a fixed-shape session failed: {exc.message}"[:300]}
    fixed, dynamic = sum(r["fixed_ms"] for r in rows), sum(r["dynamic_ms"] for r in rows)
    mode = "fixed" if fixed < dynamic * (1 - FIXED_MIN_GAIN) else "dynamic"
    why = (f"measured: fixed {fixed:.3f} ms vs dynamic {dynamic:.3f} ms over {len(rows)} specialisations; "
           f"fixed needs a gain of at least {FIXED_MIN_GAIN:.0%}")
    return {**choice, "mode": mode, "reason": why, "fixed_ms": round(fixed, 4), "dynamic_ms": round(dynamic, 4),
            "timings": rows}


def _generic_feed(inputs: list[dict[str, Any]], symbols: Mapping[str, int]) -> dict[str, Any] | None:
    """Inputs of the specialisation's shapes when the task gives none: zeros, and positions 0..n-1."""
    import numpy as np

    feed = {}
    for i in inputs:
        shape = [int(d) if d.isdigit() else symbols.get(d) for d in i["shape"]]
        if any(d is None for d in shape):
            return None
        if i["type"] == "tensor(int64)":
            value = np.zeros(shape, np.int64)
            if i["name"] == "position_ids":
                value[...] = np.arange(shape[-1])
        elif i["type"] == "tensor(float)":
            value = np.zeros(shape, np.float32)
        else:
            return None
        feed[i["name"]] = value
    return feed


def _measure(model: Path, info: Mapping[str, Any], specs: list[dict[str, Any]],
             feeds: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Median ms per run of a fixed-shape and the dynamic session, per specialisation (interleaved)."""
    dynamic = _open(model, info)
    rows = []
    for spec, feed in zip(specs, feeds, strict=True):
        fixed = _open(model, info, overrides=spec["symbols"])
        times: dict[str, list[float]] = {"fixed": [], "dynamic": []}
        sessions = {"fixed": fixed, "dynamic": dynamic}
        try:
            for s in sessions.values():
                s.run(None, dict(feed))  # warm-up
            start = time.perf_counter()
            while _more(len(times["fixed"]), time.perf_counter() - start):
                for kind, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, dict(feed))
                    times[kind].append((time.perf_counter() - t0) * 1e3)
        except Exception as exc:
            raise CompileError(f"{spec['name']}: {_one_line(exc)}") from exc
        rows.append({"name": spec["name"], "symbols": dict(spec["symbols"]), "runs": len(times["fixed"]),
                     **{f"{k}_ms": round(sorted(v)[len(v) // 2], 4) for k, v in times.items()}})
    return rows


def _more(runs: int, elapsed: float) -> bool:
    if runs < 2:
        return True
    if runs >= _MAX_RUNS or elapsed >= _MAX_SECONDS:
        return False
    return runs < _MIN_RUNS or elapsed < _MIN_SECONDS


# --- opening an artifact --------------------------------------------------------------------------


def _read_info(artifact_dir: Path) -> dict[str, Any]:
    meta = Path(artifact_dir) / SESSION_FILE
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompileError(f"cannot read {meta} for {Path(artifact_dir) / MODEL_FILE}: {_one_line(exc)}") from exc


def open_session(artifact_dir: Path, num_threads: int | None = None) -> onnxruntime.InferenceSession:
    """Open ``artifact_dir/model.onnx`` as one dynamic session with the settings in ``session.json``.

    The saved model is already optimised, so it opens with optimisation disabled (unless
    ``graph_optimization: all`` left layout optimisations for run time): measured on the tiny
    llama, disabled creates the session faster than basic and runs equally fast.
    """
    artifact_dir = Path(artifact_dir)
    return _open(artifact_dir / MODEL_FILE, _read_info(artifact_dir), num_threads)


class Sessions:
    """The sessions of a compiled artifact, opened lazily: :meth:`session_for` concrete symbol values."""

    def __init__(self, artifact_dir: Path, num_threads: int | None = None) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.info = _read_info(self.artifact_dir)
        self.num_threads = num_threads
        self.specializations: list[dict[str, Any]] = list(self.info.get("specializations") or [])
        self.mode: str = self.info.get("session", {}).get("mode", "dynamic")
        self._open: dict[str, onnxruntime.InferenceSession] = {}

    def specialization_for(self, symbols: Mapping[str, int]) -> dict[str, Any] | None:
        """The specialisation whose every symbol has the given value, if any."""
        for spec in self.specializations:
            if all(symbols.get(k) == v for k, v in spec["symbols"].items()):
                return spec
        return None

    def session_for(self, symbols: Mapping[str, int]) -> onnxruntime.InferenceSession:
        """A session that runs inputs of these symbol values: the specialisation's fixed-shape session in
        fixed mode, otherwise (or for shapes no specialisation covers) the dynamic session."""
        spec = self.specialization_for(symbols) if self.mode == "fixed" else None
        name = spec["name"] if spec else ""
        if name not in self._open:
            overrides = spec["symbols"] if spec else None
            self._open[name] = _open(self.artifact_dir / MODEL_FILE, self.info, self.num_threads, overrides)
        return self._open[name]


def open_sessions(artifact_dir: Path, num_threads: int | None = None) -> Sessions:
    """The artifact's sessions as ``session.json`` chose them (fixed-shape per specialisation or dynamic)."""
    return Sessions(artifact_dir, num_threads)

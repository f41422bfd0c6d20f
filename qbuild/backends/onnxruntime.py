"""The ONNX Runtime backend: an offline-optimised ``model.onnx`` plus the ``session.json`` to open it.

ORT_ENABLE_ALL (and ORT_ENABLE_LAYOUT) can write hardware-specific layouts into a saved model, so the
saved model is optimised at most at "extended"; with ``graph_optimization: all`` the remaining,
layout-level optimisations run online when the artifact is opened (``runtime_optimization``).
"""

from __future__ import annotations

import json
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


def compile_onnx(onnx_path: Path, out_dir: Path, *, num_cores: int, graph_optimization: str) -> dict[str, Any]:
    """Optimise ``onnx_path`` offline into ``out_dir/model.onnx`` (+ ``.data``) and write ``session.json``."""
    import onnxruntime as ort

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if graph_optimization not in _PLAN:
        raise CompileError(f"compile.graph_optimization: unknown level {graph_optimization!r} for {onnx_path}")
    if not onnx_path.is_file():
        raise CompileError(f"ONNX file {onnx_path} does not exist")
    target = out_dir / MODEL_FILE
    if target.resolve() == onnx_path.resolve():
        raise CompileError(f"cannot compile {onnx_path} onto itself; use another output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    saved, runtime = _PLAN[graph_optimization]
    so = _options(saved, num_cores)
    so.optimized_model_filepath = str(target)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_MIN_BYTES)
    )
    try:
        session = ort.InferenceSession(str(onnx_path), so, providers=PROVIDERS)
    except Exception as exc:
        raise CompileError(f"ONNX Runtime could not compile {onnx_path}: {_one_line(exc)}") from exc
    info = {
        "backend": "onnxruntime",
        "onnxruntime": ort.__version__,
        "providers": session.get_providers(),
        "intra_op_num_threads": num_cores,
        "inter_op_num_threads": 1,
        "graph_optimization": graph_optimization,
        "saved_optimization": saved,
        "runtime_optimization": runtime,
        "inputs": _io(session.get_inputs()),
        "outputs": _io(session.get_outputs()),
    }
    (out_dir / SESSION_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return {**info, "files": files}


def open_session(artifact_dir: Path, num_threads: int | None = None) -> onnxruntime.InferenceSession:
    """Open ``artifact_dir/model.onnx`` with the settings recorded in ``session.json``.

    The saved model is already optimised, so it opens with optimisation disabled (unless
    ``graph_optimization: all`` left layout optimisations for run time): measured on the tiny
    llama, disabled creates the session faster than basic and runs equally fast.
    """
    import onnxruntime as ort

    artifact_dir = Path(artifact_dir)
    model, meta = artifact_dir / MODEL_FILE, artifact_dir / SESSION_FILE
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompileError(f"cannot read {meta} for {model}: {_one_line(exc)}") from exc
    threads = num_threads if num_threads is not None else int(info.get("intra_op_num_threads", 0))
    so = _options(info.get("runtime_optimization", "disabled"), threads)
    try:
        return ort.InferenceSession(str(model), so, providers=info.get("providers", PROVIDERS))
    except Exception as exc:
        raise CompileError(f"ONNX Runtime could not open {model}: {_one_line(exc)}") from exc

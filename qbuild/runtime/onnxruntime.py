"""Opening an ONNX Runtime artifact: ``model.onnx`` with the settings its ``session.json`` records, as one
dynamic session or fixed-shape sessions per specialisation (as the compile stage chose)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.errors import RunError, one_line

if TYPE_CHECKING:
    import onnxruntime

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SESSION_FILE = "session.json"
PROVIDERS = ["CPUExecutionProvider"]
#: ONNX Runtime optimisers qbuild turns off, at compile and when a session opens. BiasGeluFusion: the separate Add
#: and Gelu it would fuse run faster than its BiasGelu kernel, with bit-identical outputs (all-MiniLM-L6-v2,
#: extended level, 2 threads, per-round medians of 10 and 14 interleaved rounds: 1.02, 1.04, 1.01, 1.00 and 1.04,
#: 1.02, 1.05, 1.02 at batch x length 32x64, 8x32, 8x64, 32x128; the GELU alone on 32x64x1536: 1.27 vs 2.10 ms)
DISABLED_OPTIMIZERS = ["BiasGeluFusion"]
_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def session_options(level: str, intra: int) -> onnxruntime.SessionOptions:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.log_severity_level = 3  # errors only
    return so


def open_model_session(model: Path, info: Mapping[str, Any], threads: int | None = None,
          overrides: Mapping[str, int] | None = None, *, spinning: bool = True,
          stop_spinning: bool = False) -> onnxruntime.InferenceSession:
    """A session on ``model`` with the recorded settings; ``overrides`` fix symbolic dims by name.

    ``spinning=False``: the intra-op threads sleep between runs instead of spinning (an idle session's
    spinning threads compete for the cores with everything else the caller runs between calls).
    ``stop_spinning``: they spin within a run but stop at its end (``session.force_spinning_stop``), so that the
    next run of another session of the same process gets the cores."""
    import onnxruntime as ort

    n = threads if threads is not None else int(info.get("intra_op_num_threads", 0))
    level = info.get("runtime_optimization", "disabled")
    if overrides and level == "disabled":
        # every symbolic dim fixed: constant folding now removes the shape arithmetic the saved (dynamic) graph
        # must keep, about 2/3 of a KV decoder's nodes (100M Llama decode: +13% tok/s median against disabled,
        # the two sessions timed interleaved in one process, one run; the session opens no slower)
        level = "basic"
    so = session_options(level, n)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if stop_spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    for dim, value in (overrides or {}).items():
        so.add_free_dimension_override_by_name(dim, int(value))
    try:
        return ort.InferenceSession(str(model), so, providers=info.get("providers", PROVIDERS),
                                    disabled_optimizers=DISABLED_OPTIMIZERS)
    except Exception as exc:
        raise RunError(f"ONNX Runtime could not open {model}: {one_line(exc)}") from exc


def _read_info(artifact_dir: Path) -> dict[str, Any]:
    meta = Path(artifact_dir) / SESSION_FILE
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {meta} for {Path(artifact_dir) / MODEL_FILE}: {one_line(exc)}") from exc


def open_session(artifact_dir: Path, num_threads: int | None = None) -> onnxruntime.InferenceSession:
    """Open ``artifact_dir/model.onnx`` as one dynamic session with the settings in ``session.json``.

    The saved model is already optimised, so it opens with optimisation disabled (unless
    ``graph_optimization: all`` left layout optimisations for run time): measured on the tiny
    llama, disabled creates the session faster than basic and runs equally fast.
    """
    artifact_dir = Path(artifact_dir)
    return open_model_session(artifact_dir / MODEL_FILE, _read_info(artifact_dir), num_threads)


class Sessions:
    """The sessions of a compiled artifact, opened lazily: :meth:`session_for` concrete symbol values.

    ``any_shape``: shapes no specialisation names run in the dynamic session (ONNX Runtime takes any shape).
    ``spinning``: see :func:`open_model_session` (set it before the first ``session_for``). In fixed mode the
    sessions stop spinning at the end of each run (``stop_spinning``): the threads of the session that ran last
    (decode) kept spinning into the next one's run (the next prompt's prefill) and took its cores (100M Llama,
    back-to-back generates, three runs: a 32-token prefill took 45-47 ms median instead of 22-23; decode speed
    unchanged within the machine's noise)."""

    any_shape = True

    def __init__(self, artifact_dir: Path, num_threads: int | None = None) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.info = _read_info(self.artifact_dir)
        self.num_threads = num_threads
        self.spinning = True
        self.specializations: list[dict[str, Any]] = list(self.info.get("specializations") or [])
        self.mode: str = self.info.get("session", {}).get("mode", "dynamic")
        self.stop_spinning = self.mode == "fixed"  # several sessions take turns (class doc)
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
            path = self.artifact_dir / MODEL_FILE
            self._open[name] = open_model_session(path, self.info, self.num_threads, overrides,
                                                  spinning=self.spinning, stop_spinning=self.stop_spinning)
        return self._open[name]


def open_sessions(artifact_dir: Path, num_threads: int | None = None) -> Sessions:
    """The artifact's sessions as ``session.json`` chose them (fixed-shape per specialisation or dynamic)."""
    return Sessions(artifact_dir, num_threads)


class OrtArtifact:
    """An ONNX Runtime artifact (``qbuild.runtime.Artifact``)."""

    backend = "onnxruntime"

    def __init__(self, directory: Path, threads: int | None = None) -> None:
        self.directory, self.threads = Path(directory), threads

    def sessions(self) -> Sessions:
        return Sessions(self.directory, self.threads)

    def kv_runtime(self, *, ctx_len: int, buckets: Sequence[int]) -> Any:
        from qbuild.runtime.generate import KVRuntime

        return KVRuntime(self.directory, ctx_len=ctx_len, buckets=buckets, num_threads=self.threads)

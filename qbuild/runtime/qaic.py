"""Running a QPC on Cloud AI 100 with the SDK's Python runtime (``qaicrt``), through the loops ONNX Runtime uses.

``qaicrt`` lives in ``<sdk>/dev/lib/<arch>`` and its protobuf descriptions (``QAicApi_pb2``) in
``<sdk>/dev/python`` (../shared/reference/qefficient.md section 8). Generation reuses ``KVRuntime``'s
prefill/decode loop; only one step differs: the KV cache is retained on the device (``-retained-state``),
so the ``past_*`` inputs and ``*_RetainedState`` outputs are never copied to the host. numpy and
qaicrt are imported only when a session is opened.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from qbuild.errors import CannotExecute, RunError
from qbuild.runtime.generate import KVRuntime

QPC_DIR = "qpc"


def _sdk_python_dirs(sdk_root: str | None = None) -> list[str]:
    root = Path(sdk_root or os.environ.get("QAIC_SDK_DIR") or "/opt/qti-aic")
    return [str(root / "dev" / "lib" / platform.machine()), str(root / "dev" / "python")]


def qaicrt_available(sdk_root: str | None = None) -> bool:
    """Whether ``qaicrt`` and ``QAicApi_pb2`` can be imported (on sys.path or in the SDK), without importing."""
    if find_spec("qaicrt") is not None and find_spec("QAicApi_pb2") is not None:
        return True
    lib, py = map(Path, _sdk_python_dirs(sdk_root))
    return lib.is_dir() and any(lib.glob("qaicrt*")) and (py / "QAicApi_pb2.py").is_file()


def _import() -> tuple[Any, Any]:
    for d in _sdk_python_dirs():
        if d not in sys.path:
            sys.path.append(d)
    try:
        import QAicApi_pb2
        import qaicrt
    except ImportError as exc:
        raise CannotExecute(f"cannot import the Cloud AI 100 runtime: {exc}",
                            hint="install the Platform and Apps SDK, or build with compile=onnxruntime") from exc
    return qaicrt, QAicApi_pb2


def compiled_specializations(artifact_dir: Path) -> list[dict[str, int]]:
    """The symbols of each compiled specialisation, from ``specializations.json`` (named or flat)."""
    data = json.loads((Path(artifact_dir) / "specializations.json").read_text(encoding="utf-8"))
    return [{k: int(v) for k, v in s.get("symbols", s).items()} for s in data["specializations"]]


class QpcSession:
    """One QPC loaded on the device(s): named numpy inputs in, named numpy outputs out."""

    def __init__(self, artifact_dir: Path, device_ids: Sequence[int] | None = None) -> None:
        import numpy as np

        rt, api = _import()
        self._rt, ok = rt, rt.QStatus.QS_SUCCESS
        self.context = rt.Context(rt.QIDList(list(device_ids))) if device_ids else rt.Context()
        self.queue = rt.Queue(self.context, device_ids[0] if device_ids else 0)
        qpc = rt.Qpc(str(Path(artifact_dir) / QPC_DIR))
        status, raw = qpc.getIoDescriptor()
        if status != ok:
            raise RunError(f"{artifact_dir}: cannot read the QPC's I/O descriptor")
        desc = api.IoDesc()
        desc.ParseFromString(bytes(raw))
        dtypes = {api.FLOAT_TYPE: np.float32, api.FLOAT_16_TYPE: np.float16, api.INT8_Q_TYPE: np.int8,
                  api.UINT8_Q_TYPE: np.uint8, api.INT16_Q_TYPE: np.int16, api.INT32_Q_TYPE: np.int32,
                  api.INT32_I_TYPE: np.int32, api.INT64_I_TYPE: np.int64, api.INT8_TYPE: np.int8}
        self.bindings = list(desc.selected_set.bindings)
        self.dtype = {b.name: np.dtype(dtypes[b.type]) for b in self.bindings}
        self.index = {b.name: b.index for b in self.bindings}
        self.input_names = [b.name for b in self.bindings if b.dir == api.BUFFER_IO_TYPE_INPUT]
        self.output_names = [b.name for b in self.bindings if b.dir == api.BUFFER_IO_TYPE_OUTPUT]
        self.program = rt.Program(self.context, device_ids[0] if device_ids and len(device_ids) == 1 else None,
                                  qpc, rt.QAicProgramProperties())
        if self.program.load() != ok or self.program.activate() != ok:
            raise RunError(f"{artifact_dir}: cannot load the QPC on the device")
        self.exec = rt.ExecObj(self.context, self.program)
        self.buffers = [rt.QBuffer(bytes(b.size)) for b in self.bindings]
        self.dims = rt.BufferDimensionsVecRef([(self.dtype[b.name].itemsize, list(b.dims)) for b in self.bindings])

    def set(self, name: str, array: Any) -> None:
        """Bind ``array`` (an empty array: keep this buffer on the device) to a named input or output."""
        i = self.index[name]
        self.buffers[i] = self._rt.QBuffer(array.tobytes())
        self.dims[i] = (array.itemsize, list(array.shape) or [1])

    def skip(self, names: Sequence[str]) -> None:
        import numpy as np

        for name in names:
            self.set(name, np.array([]))

    def run(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Execute once; return every output that was not skipped."""
        import numpy as np

        ok = self._rt.QStatus.QS_SUCCESS
        for name, array in feed.items():
            self.set(name, np.ascontiguousarray(array, dtype=self.dtype[name]))
        if self.exec.setData(self.buffers, self.dims) != ok or self.queue.enqueue(self.exec) != ok:
            raise RunError("Cloud AI 100: cannot submit the inputs")
        if self.exec.waitForCompletion() != ok:
            raise RunError(f"Cloud AI 100: execution failed (input shapes {[list(a.shape) for a in feed.values()]}"
                           " match no compiled specialisation?)")
        status, outs = self.exec.getData()
        if status != ok:
            raise RunError("Cloud AI 100: cannot read the outputs")
        result = {}
        for name in self.output_names:
            i = self.index[name]
            if self.buffers[i].size and outs[i].size:
                result[name] = np.frombuffer(bytes(outs[i]), self.dtype[name]).reshape(self.dims[i][1])
        return result


class QaicKVRuntime(KVRuntime):
    """``KVRuntime``'s generation loop on a QPC; the KV cache stays on the device between steps."""

    def __init__(self, compiled: Path, *, device_ids: Sequence[int] | None = None) -> None:
        specs = compiled_specializations(compiled)
        self.session = QpcSession(compiled, device_ids)
        self.ctx_len = max(s["ctx_len"] for s in specs)
        self.batch_size = specs[0]["batch_size"]
        self.buckets = sorted({s["seq_len"] for s in specs if s["seq_len"] > 1} or {1})
        self.kv_inputs = [n for n in self.session.input_names if n.startswith(("past_key.", "past_value."))]
        self.has_lora = "lora_ids" in self.session.input_names  # adapters in the program (issue 15)
        self.session.skip([*self.kv_inputs, *(n for n in self.session.output_names if "RetainedState" in n)])

    def _alloc(self, batch: int) -> None:
        if batch != self.batch_size:
            raise RunError(f"this QPC was compiled for batch {self.batch_size}, got {batch} prompts",
                           hint="set seq.batch_size to the number of prompts and rebuild")

    def _step(self, ids: Any, pos: Any) -> Any:
        lora = {} if getattr(self, "_lora", None) is None else {"lora_ids": self._lora}
        return self.session.run({"input_ids": ids, "position_ids": pos, **lora})["logits"]


def embed(artifact_dir: Path, input_ids: Any, attention_mask: Any, *, device_ids: Sequence[int] | None = None,
          session: QpcSession | None = None) -> Any:
    """Run an embedding QPC: zero-pad to the smallest compiled seq_len that holds the input; the first output."""
    import numpy as np

    lengths = sorted(s["seq_len"] for s in compiled_specializations(artifact_dir))
    n = input_ids.shape[1]
    target = next((s for s in lengths if s >= n), None)
    if target is None:
        raise RunError(f"an input of {n} tokens is longer than the largest compiled length {lengths[-1]}",
                       hint="add a longer seq.lengths bucket")
    pad = ((0, 0), (0, target - n))
    session = session or QpcSession(artifact_dir, device_ids)
    out = session.run({"input_ids": np.pad(input_ids, pad), "attention_mask": np.pad(attention_mask, pad)})
    result = out[session.output_names[0]]
    return result[:, :n] if result.ndim == 3 and result.shape[1] == target else result  # token outputs: unpad


class QpcSessions:
    """An embedding QPC behind the interface ``Embedder`` uses for ONNX Runtime sessions (fixed shapes)."""

    mode = "fixed"
    any_shape = False  # a QPC runs its specialisations only

    def __init__(self, artifact_dir: Path, device_ids: Sequence[int] | None = None) -> None:
        self.session = QpcSession(artifact_dir, device_ids)
        self.specializations = [{"name": f"Embedding_{i}", "symbols": s}
                                for i, s in enumerate(compiled_specializations(artifact_dir))]
        self.info: dict[str, Any] = {"backend": "qaic", "intra_op_num_threads": None}

    def session_for(self, symbols: dict[str, int]) -> QpcSessions:
        return self  # one program holds every specialisation; the input shapes select it

    def run(self, _names: Any, feed: dict[str, Any]) -> list[Any]:
        return [self.session.run(feed)[self.session.output_names[0]]]


class QpcArtifact:
    """A Cloud AI 100 QPC artifact (``qbuild.runtime.Artifact``), run through qaicrt."""

    backend = "qaic"

    def __init__(self, directory: Path, device_ids: Sequence[int] | None = None) -> None:
        self.directory, self.device_ids = Path(directory), device_ids

    def sessions(self) -> QpcSessions:
        return QpcSessions(self.directory, self.device_ids)

    def kv_runtime(self, *, ctx_len: int, buckets: Sequence[int]) -> QaicKVRuntime:
        return QaicKVRuntime(self.directory, device_ids=self.device_ids)  # the QPC knows its ctx_len and buckets

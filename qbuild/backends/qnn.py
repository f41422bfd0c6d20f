"""The QNN backend (``compile=qnn``): the exported ONNX -> a Cloud AI 100 program through the QNN tool chain.

QEfficient's ``enable_qnn`` path (../shared/reference/qefficient-modes.md section 2): ``qairt-converter``
turns the graph into ``model.dlc`` with the custom IO config built from the specialisations, then
``qnn-context-binary-generator`` packages ``qpc/programqpc.bin``. Discovery is in ``qnn_sdk``, the command
lines and config files in ``qnn_command``, running each tool in ``qaic_run`` (the qaic backend's runner:
streamed log, timeout, Ctrl-C, ``CompileError``). The artifact holds ``qpc/``, the config files,
``specializations.json`` (what the Cloud AI 100 runtime opens it by), a log per tool and the exact commands
(``command.txt``, ``command.json``). ``model.dlc`` is removed once the program is built: it is a second copy
of the weights that nothing runs. The program runs on the Cloud AI 100 runtime (qaicrt), as QEfficient runs it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.backends import Backend, qnn_command, qnn_sdk
from qbuild.backends.qnn_command import QnnOptions, Tensor
from qbuild.backends.qnn_sdk import QnnSdk
from qbuild.errors import CompileError, PlanError, one_line
from qbuild.manifest.schema import Manifest
from qbuild.plan.params import unkeyed

if TYPE_CHECKING:
    from qbuild.runtime import Artifact
    from qbuild.stages.base import StageContext
    from qbuild.store import StatCache
    from qbuild.tasks import Task

__all__ = ["QnnBackend", "QnnParams", "onnx_tensors"]
PLACEHOLDERS = {"<onnx>": "the export stage's ONNX file", "<out>": "the compile artifact directory"}
LOGS = {"qairt-converter": "converter.log", "qnn-context-binary-generator": "context_binary_generator.log"}
HINT = ("set $QNN_SDK_ROOT (or compile.qnn.sdk_dir) to the QNN / QAIRT SDK root; "
        "to build for CPU use compile=onnxruntime")


@dataclass(frozen=True)
class QnnParams:
    """What a QNN compile runs on: the options, the SDK found, the specialisations."""

    options: QnnOptions
    sdk: QnnSdk
    specializations: tuple[dict[str, Any], ...]
    timeout_s: int = unkeyed(7200, why="a limit on each tool's run time, not an input to it")


def onnx_tensors(path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """The graph's inputs and outputs (name, numpy dtype name, dims), weights not loaded."""
    import onnx
    from onnx import helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CompileError(f"cannot read the ONNX graph {path}: {one_line(exc)}",
                           hint="rebuild the export stage (its cache entry may be damaged)") from exc

    def tensor(v: Any) -> Tensor:
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else "")
                     for d in tt.shape.dim)
        return Tensor(v.name, str(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims)

    return [tensor(v) for v in model.graph.input], [tensor(v) for v in model.graph.output]


def custom_io(o: QnnOptions, io_names: list[str]) -> dict[str, str]:
    """The custom IO precisions QEfficient passes: the retained-state KV inputs and outputs (qaic's rule)."""
    from qbuild.backends.qaic_command import kv_custom_io

    return dict(kv_custom_io(io_names, o.kv_precision)) if o.kv_precision else {}


class QnnBackend(Backend):
    name = "qnn"
    tools = ("onnx",)
    code = ("backends/qnn.py", "backends/qnn_command.py", "backends/qnn_sdk.py", "backends/qaic_run.py",
            "runtime/qaic.py")

    def available(self, m: Manifest) -> tuple[bool, str]:
        sdk = qnn_sdk.discover(m)
        if sdk is not None:
            return True, f"QNN tool chain found: {qnn_sdk.describe(sdk)}"
        return False, f"no QNN tool chain found; {qnn_sdk.looked_for(m)}"

    def resolve(self, m: Manifest, task: Task, stats: StatCache) -> QnnParams:
        from qbuild.backends.qaic import task_exports_qaic_graph
        from qbuild.backends.qaic_command import export_dtype

        sdk = qnn_sdk.discover(m)
        if sdk is None:
            raise PlanError(f"compile.backend: qnn needs the QNN SDK; {qnn_sdk.looked_for(m)}", hint=HINT)
        # compiler_hardware_version "2.0" is AI 100, which has no bfloat16: exported as float32 (as for qaic)
        dtype = export_dtype(m.model.dtype, "ai100") if task_exports_qaic_graph(task) else m.model.dtype
        o = qnn_command.options(m, retained_state=task.retained_state, graph_dtype=dtype)
        return QnnParams(o, sdk, tuple(task.specializations(m)), m.compile.qnn.timeout_s)

    def fingerprint(self, p: QnnParams) -> dict[str, str]:
        return qnn_sdk.fingerprint(p.sdk)

    def can_execute(self, p: QnnParams) -> tuple[bool, str]:
        from qbuild.runtime.qaic import qaicrt_available

        if qaicrt_available():
            return True, "the Cloud AI 100 runtime (qaicrt) is installed to run programqpc.bin"
        where = os.environ.get("QAIC_SDK_DIR") or "/opt/qti-aic"
        return False, (f"a QNN build's programqpc.bin runs on a Cloud AI 100 card through the Cloud AI 100 runtime "
                       f"(qaicrt), which is not installed under {where}")

    def commands(self, p: QnnParams, onnx: Path | None = None) -> tuple[list[str], list[str]]:
        """The two commands, paths as placeholders (``onnx``: the real graph path when it exists)."""
        where = str(onnx) if onnx is not None and Path(onnx).is_file() else "<onnx>"
        return (qnn_command.converter_argv(p.sdk, p.options, onnx=where),
                qnn_command.generator_argv(p.sdk, p.options))

    def describe(self, p: QnnParams, onnx: Path | None = None) -> list[str]:
        o, specs = p.options, list(p.specializations)
        converter, generator = self.commands(p, onnx)
        backend = json.dumps(qnn_command.backend_config(o, len(specs)), separators=(",", ":"))
        lines = [f"qnn: {qnn_sdk.describe(p.sdk)}; {len(specs)} graphs "
                 f"({', '.join(qnn_command.graph_names(len(specs)))}), one per specialisation",
                 "  converter: " + shlex.join(converter), "  generator: " + shlex.join(generator),
                 "  " + "; ".join(f"{k}: {v}" for k, v in PLACEHOLDERS.items()),
                 "  specializations: " + "; ".join(f"{s['name']} {json.dumps(s['symbols'])}" for s in specs),
                 f"  {qnn_command.BACKEND_JSON}: {backend}"]
        if o.kv_precision:
            lines.append(f"  {qnn_command.CUSTOM_IO_FILE}: retained-state KV at {o.kv_precision}"
                         + (f" (uint8, {qnn_command.DATA_FORMAT})" if o.mxint8 else ""))
        if o.config:
            lines.append(f"  qnn_config: {o.config}")
        return lines

    def compile(self, p: QnnParams, onnx: Path, export: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
        sdk, o, specs, out = p.sdk, p.options, list(p.specializations), ctx.out
        ctx.progress("reading the ONNX graph's inputs and outputs", None)
        inputs, outputs = onnx_tensors(onnx)
        io = custom_io(o, [t.name for t in [*inputs, *outputs]])
        out.mkdir(parents=True, exist_ok=True)
        files = qnn_command.side_files(sdk, o, specs, inputs, outputs, io, out=str(out))
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
        converter, generator = self.commands(p)
        ran = [qnn_command.converter_argv(sdk, o, onnx=str(onnx), out=str(out)),
               qnn_command.generator_argv(sdk, o, out=str(out))]
        (out / "command.txt").write_text(f"# <onnx> = {onnx}\n# <out> = this directory\n{shlex.join(converter)}\n"
                                         f"{shlex.join(generator)}\n", encoding="utf-8")
        ctx.progress(f"qairt-converter: {onnx.name} -> {qnn_command.DLC_FILE}", None)
        seconds = [_run(ctx, ran[0], "qairt-converter", p.timeout_s)]
        if not (out / qnn_command.DLC_FILE).is_file():
            raise CompileError(f"qairt-converter exited 0 but wrote no {qnn_command.DLC_FILE}", command=ran[0],
                               returncode=0)
        (out / qnn_command.QPC_DIR).mkdir(exist_ok=True)
        ctx.progress(f"qnn-context-binary-generator: {len(specs)} graphs -> {qnn_command.QPC_DIR}/"
                     f"{qnn_command.QPC_BINARY}", None)
        seconds.append(_run(ctx, ran[1], "qnn-context-binary-generator", p.timeout_s))
        if not (out / qnn_command.QPC_DIR / qnn_command.QPC_BINARY).is_file():
            raise CompileError(f"qnn-context-binary-generator exited 0 but wrote no {qnn_command.QPC_DIR}/"
                               f"{qnn_command.QPC_BINARY}", command=ran[1], returncode=0)
        (out / qnn_command.DLC_FILE).unlink()
        record = {"argv": [converter, generator], "placeholders": {"<onnx>": str(onnx), "<out>": "."}, "ran": ran,
                  "seconds": [round(s, 3) for s in seconds], "sdk": _sdk_record(sdk)}
        (out / "command.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return {"backend": "qnn", "sdk": _sdk_record(sdk), "graphs": qnn_command.graph_names(len(specs)),
                "command": [converter, generator], "qpc": qnn_command.QPC_DIR,
                "compile_seconds": round(sum(seconds), 3),
                "files": sorted([*files, *LOGS.values(), "command.txt", "command.json"])}

    def open(self, directory: Path, *, threads: int | None = None) -> Artifact:
        from qbuild.runtime.qaic import QpcArtifact

        return QpcArtifact(directory)


def _run(ctx: StageContext, cmd: list[str], tool: str, timeout_s: int) -> float:
    """One tool through the qaic runner, its output streamed to ``<tool>.log``; a failure keeps that log."""
    from qbuild.backends.qaic_run import run_compiler

    log = ctx.out / LOGS[tool]
    try:
        return run_compiler(cmd, log_path=log, timeout_s=timeout_s, progress=ctx.progress, tool=tool,
                            timeout_key="compile.qnn.timeout_s")
    except CompileError as exc:
        _keep_log(ctx, exc, log, tool)
        raise


def _keep_log(ctx: StageContext, exc: CompileError, log: Path, tool: str) -> None:
    """Copy the failed tool's log out of the staging directory (which is removed) and name it in the hint."""
    if not log.is_file():
        return
    dest = ctx.store.root / "logs" / f"{tool}-{ctx.out.parent.name.split('.')[0][:16]}-{int(time.time())}.log"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, dest)
    except OSError:
        return
    exc.hint = f"full {tool} log: {dest}" + (f"; {exc.hint}" if exc.hint else "")


def _sdk_record(sdk: QnnSdk) -> dict[str, Any]:
    info = qnn_sdk.read_sdk_yaml(Path(sdk.root))
    return {"root": sdk.root, "version": sdk.version, "sdk.yaml": json.loads(json.dumps(info, default=str))}

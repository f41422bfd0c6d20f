"""The Cloud AI 100 backend: the exported ONNX -> a QPC with qaic-compile (or qaic-exec on older SDKs).

Discovery is in ``qaic_sdk``, the command line and side files in ``qaic_command`` (the only place that
knows qaic flags), running the compiler in ``qaic_run``. The artifact directory holds ``qpc/`` (the
compiler's ``-aic-binary-dir``), the side files, ``compile.log`` and the exact command
(``command.txt``, ``command.json``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbuild.backends import Backend, qaic_command, qaic_sdk
from qbuild.backends.qaic_command import QaicOptions
from qbuild.backends.qaic_sdk import Hardware, Sdk, sdk_dir
from qbuild.errors import CompileError, PlanError, one_line
from qbuild.manifest.schema import Manifest
from qbuild.plan.params import unkeyed

if TYPE_CHECKING:
    from qbuild.runtime import Artifact
    from qbuild.stages.base import StageContext
    from qbuild.store import StatCache
    from qbuild.tasks import Task

__all__ = ["QaicBackend", "QaicGraph", "export_graph", "sdk_dir", "targets_qaic"]
PLACEHOLDERS = {"<onnx>": "the export stage's ONNX file", "<out>": "the compile artifact directory"}


def onnx_io(path: Path) -> tuple[list[str], bool]:
    """The graph's input and output names, and whether it holds ONNX functions (weights not loaded).

    The functions are recorded, not acted on: ``-sub-functions`` follows ``compile.qaic.use_onnx_subfunctions``
    (QEfficient's default graph holds CtxScatter/CtxGather/CustomRMSNorm functions and gets no such flag)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CompileError(f"cannot read the ONNX graph {path}: {one_line(exc)}",
                           hint="rebuild the export stage (its cache entry may be damaged)") from exc
    names = [v.name for v in model.graph.input] + [v.name for v in model.graph.output]
    return names, len(model.functions) > 0


def _describe(sdk: Sdk) -> str:
    versions = ", ".join(f"{k} SDK {v}" for k, v in (("Apps", sdk.apps_version), ("Platform", sdk.platform_version))
                         if v)
    return f"{sdk.kind} at {sdk.compiler}" + (f" ({versions})" if versions else " (no SDK version files)")


@dataclass(frozen=True)
class QaicParams:
    """What a qaic compile runs on: the compiler options, the SDK found, the specialisations."""

    options: QaicOptions
    sdk: Sdk
    specializations: tuple[dict[str, Any], ...]
    node_precision_sha256: str | None  # the node-precision file's content (its path is not keyed)
    hardware: Hardware | None = unkeyed(None, why="how the hardware version was found (the cards qaic-util listed); "
                                                  "the version itself is keyed")
    timeout_s: int = unkeyed(7200, why="a limit on the compiler's run time, not an input to it")

    @property
    def hw_why(self) -> str:
        return self.hardware.why if self.hardware else ""


def qaic_params(m: Manifest, task: Task, sdk: Sdk, hw_version: str, hardware: Hardware | None = None) -> QaicParams:
    """The compile params for ``m`` with the SDK facts given (pure: no discovery, no probe)."""
    dtype = qaic_command.export_dtype(m.model.dtype, hw_version) if task_exports_qaic_graph(task) else None
    o = qaic_command.options(m, sdk=sdk, hw_version=hw_version, spec_format=qaic_sdk.specializations_format(m, sdk),
                             retained_state=task.retained_state, graph_dtype=dtype,
                             vision_io=bool(getattr(task, "vision_io", False)))
    npi = qaic_command.node_precision_digest(o.node_precision_info) if o.node_precision_info else None
    return QaicParams(o, sdk, tuple(task.specializations(m)), npi, hardware or Hardware(hw_version, ""),
                      m.compile.qaic.timeout_s)


# --- what the export of a qaic build looks like ----------------------------------------------------------


@dataclass(frozen=True)
class QaicGraph:
    """The export of a build compiled by qaic, where it differs from the onnxruntime one (keyed by the export)."""

    dtype: str | None  # the dtype exported in when not model.dtype: float32 for bfloat16 on ai100
    sub_functions: bool  # compile.qaic.use_onnx_subfunctions: decoder layers as ONNX functions


def task_exports_qaic_graph(task: Task) -> bool:
    """Whether ``task`` exports the qaic graph form for a qaic build (CtxScatter/CtxGather, CustomRMSNorm,
    bfloat16 as float32 on ai100): the retained-state KV causal LM does (``qaic_graph = True``)."""
    return bool(getattr(task, "qaic_graph", False))


def targets_qaic(m: Manifest) -> bool:
    """Whether ``m`` compiles with qaic, or with qnn (QEfficient's QNN path converts the same graph);
    ``compile.backend: auto`` asks this machine, as the compile stage does."""
    if m.compile.backend in ("qaic", "qnn"):
        return True
    if m.compile.backend != "auto":
        return False
    from qbuild.backends import resolve_backend

    return resolve_backend(m)[0].name == "qaic"


def export_graph(m: Manifest) -> QaicGraph | None:
    """The qaic form of the export for ``m``, or None when the build does not compile with qaic.

    The hardware is asked only for a bfloat16 model (the one case where it changes the graph)."""
    if not targets_qaic(m):
        return None
    dtype = None
    qnn = m.compile.backend == "qnn"  # the QNN backend JSON's compiler_hardware_version "2.0" is ai100
    if m.model.dtype == "bfloat16":
        hw = "ai100" if qnn else qaic_sdk.detect_hardware(m, qaic_sdk.discover(m)).version
        dtype = qaic_command.export_dtype(m.model.dtype, hw)
        dtype = None if dtype == m.model.dtype else dtype
    return QaicGraph(dtype, m.compile.qaic.use_onnx_subfunctions and not qnn)


class QaicBackend(Backend):
    name = "qaic"
    tools = ("onnx",)
    code = ("backends/qaic.py", "backends/qaic_command.py", "backends/qaic_sdk.py", "backends/qaic_run.py",
            "runtime/qaic.py")

    def available(self, m: Manifest) -> tuple[bool, str]:
        sdk = qaic_sdk.discover(m)
        if sdk is not None:
            return True, f"Cloud AI 100 compiler found: {_describe(sdk)}"
        return False, f"no Cloud AI 100 compiler found; {qaic_sdk.looked_for(m)}"

    def resolve(self, m: Manifest, task: Task, stats: StatCache) -> QaicParams:
        sdk = qaic_sdk.discover(m)
        if sdk is None:
            raise PlanError(f"compile.backend: qaic needs the Cloud AI 100 SDK; no Cloud AI 100 compiler found; "
                            f"{qaic_sdk.looked_for(m)}",
                            hint="install the SDK or set compile.qaic.compiler / QAIC_SDK_DIR; "
                                 "to build for CPU use compile=onnxruntime")
        if m.compile.qaic.use_onnx_subfunctions and not task_exports_qaic_graph(task):
            raise PlanError(f"compile.qaic.use_onnx_subfunctions: not yet supported for the {task.name} task "
                            "(its export has no decoder-layer functions)",
                            hint="set compile.qaic.use_onnx_subfunctions=false")
        hardware = qaic_sdk.detect_hardware(m, sdk)
        return qaic_params(m, task, sdk, hardware.version, hardware)

    def fingerprint(self, p: QaicParams) -> dict[str, str]:
        return qaic_sdk.fingerprint(p.sdk)

    def can_execute(self, p: QaicParams) -> tuple[bool, str]:
        from qbuild.runtime.qaic import qaicrt_available

        if qaicrt_available(p.sdk.root):
            return True, "the Cloud AI 100 runtime (qaicrt) is installed"
        return False, f"no Cloud AI 100 runtime (qaicrt) under {p.sdk.root or qaic_sdk.DEFAULT_SDK_DIR}"

    def command(self, p: QaicParams, onnx: Path | None = None) -> list[str]:
        """The command that would run; with an existing ``onnx`` its functions and KV names are read."""
        o = p.options
        if onnx is None or not Path(onnx).is_file():
            return qaic_command.argv(o)
        names, _functions = onnx_io(Path(onnx))
        files = qaic_command.side_files(o, list(p.specializations), names)
        return qaic_command.argv(o, onnx=str(onnx), custom_io=qaic_command.CUSTOM_IO_FILE in files)

    def describe(self, p: QaicParams, onnx: Path | None = None) -> list[str]:
        o = p.options
        if onnx is not None and Path(onnx).is_file():
            return [f"qaic: {_describe(p.sdk)}; -aic-hw-version={o.hw_version} ({p.hw_why})",
                    "command: " + shlex.join(self.command(p, onnx))]
        specs = "; ".join(f"{s['name']} {json.dumps(s['symbols'])}" for s in p.specializations)
        lines = [f"qaic: {_describe(p.sdk)}; -aic-hw-version={o.hw_version} ({p.hw_why})",
                 "  " + shlex.join(qaic_command.argv(o)),
                 "  " + "; ".join(f"{k}: {v}" for k, v in PLACEHOLDERS.items()),
                 f"  specializations.json ({o.spec_format}): {specs}"]
        if o.kv_precision:
            lines.append(f"  custom_io.yaml: retained-state KV at {o.kv_precision}")
        if o.io_precision:
            lines.append(f"  custom_io.yaml: pixel_values / vision_embeds at {o.io_precision}")
        lines.append(f"  the graph's dtype: {o.graph_dtype}" + (" (-convert-to-fp16)" if o.convert_to_fp16 else "")
                     + ("; -sub-functions (compile.qaic.use_onnx_subfunctions)" if o.sub_functions else ""))
        return lines

    def compile(self, p: QaicParams, onnx: Path, export: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
        sdk, o, specs = p.sdk, p.options, list(p.specializations)
        ctx.progress("reading the ONNX graph's inputs and outputs", None)
        names, functions = onnx_io(onnx)
        files = write_side_files(ctx.out, o, specs, names)
        has_io = qaic_command.CUSTOM_IO_FILE in files
        template = qaic_command.argv(o, custom_io=has_io)
        cmd = qaic_command.argv(o, onnx=str(onnx), out=str(ctx.out), custom_io=has_io)
        (ctx.out / "command.txt").write_text(
            f"# <onnx> = {onnx}\n# <out> = this directory\n{shlex.join(template)}\n", encoding="utf-8")
        ctx.progress(f"{sdk.kind}: compiling for {o.hw_version} ({len(specs)} specialisations)", None)
        try:
            seconds = _run(ctx, cmd, p.timeout_s)
        except CompileError as exc:
            _keep_log(ctx, exc)
            raise
        _check_qpc(ctx.out, cmd)
        hardware = _hardware_record(p, o)
        record = {"argv": template, "placeholders": {"<onnx>": str(onnx), "<out>": "."}, "ran": cmd,
                  "seconds": round(seconds, 3), "sdk": _sdk_record(sdk), "hardware": hardware,
                  "onnx_functions": functions, "sub_functions": o.sub_functions}
        (ctx.out / "command.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return {"backend": "qaic", "sdk": _sdk_record(sdk), "aic_hw_version": o.hw_version, "hardware": hardware,
                "specializations_format": o.spec_format, "command": template, "qpc": qaic_command.QPC_DIR,
                "compile_seconds": round(seconds, 3), "files": sorted([*files, "command.txt", "command.json"])}

    def open(self, directory: Path, *, threads: int | None = None) -> Artifact:
        from qbuild.runtime.qaic import QpcArtifact

        return QpcArtifact(directory)


def write_side_files(out: Path, o: QaicOptions, specs: list[dict[str, Any]], io_names: list[str]) -> dict[str, str]:
    """Write specializations.json, custom_io.yaml, the MDP JSON and the node-precision copy into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = qaic_command.side_files(o, specs, io_names)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    if o.node_precision_info:
        shutil.copyfile(o.node_precision_info, out / qaic_command.NODE_PRECISION_FILE)
        files = {**files, qaic_command.NODE_PRECISION_FILE: ""}
    return files


def _run(ctx: StageContext, cmd: list[str], timeout_s: int) -> float:
    from qbuild.backends.qaic_run import run_compiler

    return run_compiler(cmd, log_path=ctx.out / "compile.log", timeout_s=timeout_s,
                        progress=ctx.progress)


def _check_qpc(out: Path, cmd: list[str]) -> None:
    qpc = out / qaic_command.QPC_DIR / qaic_command.QPC_BINARY
    if not qpc.is_file():
        raise CompileError(f"the qaic compiler exited 0 but wrote no {qaic_command.QPC_DIR}/{qaic_command.QPC_BINARY}",
                           command=cmd, returncode=0)


def _keep_log(ctx: StageContext, exc: CompileError) -> None:
    """Copy the failed compile's log out of the staging directory (which is removed) and name it."""
    log = ctx.out / "compile.log"
    if not log.is_file():
        return
    dest = ctx.store.root / "logs" / f"compile-{ctx.out.parent.name.split('.')[0][:16]}-{int(time.time())}.log"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, dest)
    except OSError:
        return
    exc.hint = f"full compiler log: {dest}" + (f"; {exc.hint}" if exc.hint else "")


def _hardware_record(p: QaicParams, o: QaicOptions) -> dict[str, Any]:
    """What ``-aic-hw-version`` was built for and how it was found (the cards qaic-util listed, the targets)."""
    h = p.hardware
    return {"aic_hw_version": o.hw_version, "why": h.why if h else "",
            "devices": {str(qid): variant for qid, variant in h.devices} if h else {},
            "targets": list(h.targets) if h else []}


def _sdk_record(sdk: Sdk) -> dict[str, Any]:
    return {"compiler": sdk.compiler, "kind": sdk.kind, "apps_version": sdk.apps_version,
            "platform_version": sdk.platform_version}

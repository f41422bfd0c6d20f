"""The one module that knows qaic compiler flags: the command line and its side files, as pure functions.

Facts: ../shared/reference/qefficient.md section 2. The order follows QEfficient's ``_compile``: the base
(``-aic-hw``, ``-aic-hw-version``, ``-m``), the compile options (``-retained-state``, ``-convert-to-fp16``,
``-mxfp6-matmul``, ``-aic-num-cores``), the user options in the order QEfficient's ``infer`` passes them
(``-aic-enable-depth-first``, ``-mos``, then ``-ols``, ``-node-precision-info`` and
``compile.qaic.extra_flags`` sorted by name), ``-sub-functions`` (only with
``compile.qaic.use_onnx_subfunctions``, as QEfficient), and last the side files
(``-mdp-load-partition-config``, ``-network-specialization-config``, ``-custom-IO-list-file``) and
``-aic-binary-dir``. Paths are built from two placeholders, ``onnx`` and ``out``, so the same function
gives the command that runs and the path-free one for keys and plans.

The JSON side files are written as QEfficient's ``create_json`` writes them (``indent=4``, separators
``(",", ":")``, sorted keys, no trailing newline), so a qbuild artifact diffs cleanly against a QEfficient
one. A bfloat16 model compiled for ai100 (which has no bfloat16) is exported in float32 and compiled with
``-convert-to-fp16`` and a float16 KV cache, as QEfficient loads it (``_resolve_torch_dtype``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.backends.qaic_sdk import Sdk
from qbuild.errors import ManifestError
from qbuild.manifest.schema import Manifest
from qbuild.plan.params import unkeyed

SPECIALIZATIONS_FILE = "specializations.json"
CUSTOM_IO_FILE = "custom_io.yaml"
NODE_PRECISION_FILE = "node_precision_info.yaml"
QPC_DIR = "qpc"
QPC_BINARY = "programqpc.bin"
#: the graph's dtype -> the precision of the retained-state KV cache in custom_io.yaml (CUSTOM_IO_DTYPE_MAP)
KV_PRECISION = {"float32": "float16", "float16": "float16", "bfloat16": "bfloat16"}
#: flags the backend sets itself -> the manifest key that controls each (never through extra_flags)
MANAGED_FLAGS = {
    "aic-hw": "compile.backend", "aic-hw-version": "compile.qaic.aic_hw_version", "m": "the export stage",
    "retained-state": "the task (transforms: [kv_cache])", "convert-to-fp16": "compile.qaic.convert_to_fp16",
    "mxfp6-matmul": "compile.qaic.mxfp6_matmul", "aic-num-cores": "compile.qaic.num_cores",
    "mos": "compile.qaic.mos",
    "aic-enable-depth-first": "compile.qaic.aic_enable_depth_first", "ols": "compile.qaic.ols",
    "node-precision-info": "compile.qaic.node_precision_info", "sub-functions": "compile.qaic.use_onnx_subfunctions",
    "network-specialization-config": "seq.lengths / seq.ctx_len / seq.batch_size",
    "custom-IO-list-file": "compile.qaic.mxint8_kv_cache / model.dtype",
    "mdp-load-partition-config": "compile.qaic.num_devices", "aic-binary-dir": "the cache",
    "compile-only": "the compiler kind (qaic-exec)",
}
_FLAG = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_KV_INPUT = re.compile(r"^past_(key|value)\.(\d+)$")


@dataclass(frozen=True)
class QaicOptions:
    """Everything the command and the side files depend on, resolved from the manifest and the SDK."""

    compiler: str = unkeyed(why="where the compiler lies; the SDK's versions are keyed")
    kind: str  # "qaic-compile" | "qaic-exec"
    hw_version: str  # "ai100" | "ai200"
    retained_state: bool
    convert_to_fp16: bool
    mxfp6_matmul: bool
    num_cores: int
    num_devices: int
    mos: int | None
    depth_first: bool
    ols: int | None
    node_precision_info: str | None = unkeyed(why="the file's path; its content's sha256 is keyed")
    extra_flags: tuple[tuple[str, Any], ...]  # sorted by flag name
    spec_format: str  # "named" | "flat"
    kv_precision: str | None  # custom_io.yaml precision; None: no custom_io.yaml
    sub_functions: bool = False  # -sub-functions: compile.qaic.use_onnx_subfunctions
    graph_dtype: str = "float32"  # the exported graph's float dtype (bfloat16 on ai100: float32)
    io_precision: str | None = None  # a VLM program's pixel_values / vision_embeds* in custom_io.yaml


def extra_flags(m: Manifest) -> tuple[tuple[str, Any], ...]:
    """``compile.qaic.extra_flags`` checked: names without dashes, scalar values, no flag the backend owns."""
    out = []
    for raw, value in m.compile.qaic.extra_flags.items():
        name, key = str(raw).lstrip("-"), f"compile.qaic.extra_flags.{raw}"
        if not _FLAG.match(name):
            raise ManifestError(f"{key}: {raw!r} is not a compiler flag name", key=key,
                                hint="write the flag without its value, e.g. aic-perf-metrics: true")
        if name in MANAGED_FLAGS:
            raise ManifestError(f"{key}: -{name} is set by qbuild; use {MANAGED_FLAGS[name]} instead", key=key)
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ManifestError(f"{key}: expected true, false, a number or a string, got {value!r}", key=key)
        if value is not None and value is not False:  # omitted from the command, so not in the options (key)
            out.append((name, value))
    return tuple(sorted(out))


def export_dtype(model_dtype: str, hw_version: str) -> str:
    """The dtype a model is exported in for ``hw_version``: ai100 has no bfloat16, so QEfficient loads a
    bfloat16 model as float32 there (and compiles it with -convert-to-fp16); otherwise as requested."""
    return "float32" if model_dtype == "bfloat16" and hw_version == "ai100" else model_dtype


def options(m: Manifest, *, sdk: Sdk, hw_version: str, spec_format: str, retained_state: bool,
            graph_dtype: str | None = None, vision_io: bool = False) -> QaicOptions:
    """Resolve the manifest into :class:`QaicOptions` (pure; the SDK facts are passed in).

    ``graph_dtype``: the exported graph's dtype (default ``model.dtype``; see :func:`export_dtype`);
    ``vision_io``: a VLM program, whose ``pixel_values`` / ``vision_embeds`` I/O takes the model's mapped
    dtype in custom_io.yaml (QEfficient's ``CUSTOM_IO_DTYPE_MAP``; none when the model and KV are bfloat16)."""
    q = m.compile.qaic
    dtype = graph_dtype or m.model.dtype
    kv = None
    if retained_state:
        kv = "mxint8" if q.mxint8_kv_cache else KV_PRECISION[dtype]
        if kv == "bfloat16" and dtype == "bfloat16":
            kv = None  # model and KV both bf16: QEfficient passes no custom-IO file
    io = KV_PRECISION[dtype] if vision_io else None
    if io == "bfloat16" and kv is None:
        io = None  # the vision program (its KV dtype is the mapped one), or a bf16 KV: no custom-IO file
    return QaicOptions(
        compiler=sdk.compiler, kind=sdk.kind, hw_version=hw_version, retained_state=retained_state,
        convert_to_fp16=q.convert_to_fp16 and KV_PRECISION[dtype] == "float16", mxfp6_matmul=q.mxfp6_matmul,
        num_cores=q.num_cores, num_devices=q.num_devices, mos=q.mos, depth_first=q.aic_enable_depth_first,
        ols=q.ols, node_precision_info=q.node_precision_info, extra_flags=extra_flags(m),
        spec_format=spec_format, kv_precision=kv, sub_functions=q.use_onnx_subfunctions, graph_dtype=dtype,
        io_precision=io)


def _flag(name: str, value: Any) -> list[str]:
    if value is None or value is False:
        return []
    return [f"-{name}"] if value is True else [f"-{name}={value}"]


def argv(o: QaicOptions, *, onnx: str = "<onnx>", out: str = "<out>", custom_io: bool | None = None) -> list[str]:
    """The compiler command. ``custom_io``: whether custom_io.yaml is passed (default: when KV is retained)."""
    cmd = [o.compiler, "-aic-hw", *(["-compile-only"] if o.kind == "qaic-exec" else []),
           f"-aic-hw-version={o.hw_version}", f"-m={onnx}"]
    cmd += _flag("retained-state", o.retained_state) + _flag("convert-to-fp16", o.convert_to_fp16)
    cmd += _flag("mxfp6-matmul", o.mxfp6_matmul) + [f"-aic-num-cores={o.num_cores}"]
    cmd += _flag("aic-enable-depth-first", o.depth_first) + _flag("mos", o.mos) + _flag("ols", o.ols)
    if o.node_precision_info:
        cmd.append(f"-node-precision-info={out}/{NODE_PRECISION_FILE}")
    for name, value in o.extra_flags:
        cmd += _flag(name, value)
    cmd += _flag("sub-functions", o.sub_functions)
    if o.num_devices > 1:
        cmd.append(f"-mdp-load-partition-config={out}/{mdp_file(o.num_devices)}")
    cmd.append(f"-network-specialization-config={out}/{SPECIALIZATIONS_FILE}")
    if custom_io is None:
        custom_io = o.kv_precision is not None or o.io_precision is not None
    if custom_io:
        cmd.append(f"-custom-IO-list-file={out}/{CUSTOM_IO_FILE}")
    cmd.append(f"-aic-binary-dir={out}/{QPC_DIR}")
    return cmd


def _json(obj: Any) -> str:
    """As QEfficient's ``create_json``: indent 4, ``(",", ":")`` separators, sorted keys, no final newline."""
    return json.dumps(obj, indent=4, separators=(",", ":"), sort_keys=True, ensure_ascii=True, allow_nan=False)


def specializations_json(specs: list[dict[str, Any]], fmt: str) -> str:
    """``{"specializations": [...]}``: named (``{"name", "symbols"}``) or flat; every value a string."""
    if fmt == "named":
        items: list[Any] = [{"name": s["name"], "symbols": {k: str(v) for k, v in s["symbols"].items()}}
                            for s in specs]
    else:
        items = [{k: str(v) for k, v in s["symbols"].items()} for s in specs]
    return _json({"specializations": items})


def kv_custom_io(io_names: list[str], precision: str) -> list[tuple[str, str]]:
    """Retained-state KV entries among the graph's I/O names, per layer: past_key.i, its retained output,
    past_value.i, its retained output (``_RetainedState``, or ``_InternalRetainedState`` with subfunctions)."""
    names = set(io_names)
    found = [(int(mt.group(2)), mt.group(1)) for mt in map(_KV_INPUT.match, io_names) if mt]
    entries = []
    for layer, kind in sorted(found, key=lambda t: (t[0], t[1] != "key")):
        name = f"past_{kind}.{layer}"
        entries.append((name, precision))
        for suffix in ("_RetainedState", "_InternalRetainedState"):
            if name + suffix in names:
                entries.append((name + suffix, precision))
                break
    return entries


def vision_custom_io(io_names: list[str], precision: str) -> list[tuple[str, str]]:
    """A VLM program's image I/O among the graph's names (QEfficient 1.6): the vision program's
    ``pixel_values`` and ``vision_embeds``, the language program's ``vision_embeds`` and its retained output,
    the single program's ``pixel_values`` and its retained output."""
    names = set(io_names)
    image_io = ("pixel_values", "pixel_values_RetainedState", "vision_embeds", "vision_embeds_RetainedState")
    return [(n, precision) for n in image_io if n in names]


def custom_io_yaml(entries: list[tuple[str, str]]) -> str:
    """custom_io.yaml exactly as QEfficient writes it: ``" - IOName: n\\n   Precision: p\\n\\n"`` per entry."""
    return "".join(f" - IOName: {name}\n   Precision: {precision}\n\n" for name, precision in entries)


def mdp_file(num_devices: int) -> str:
    return f"mdp_ts_{num_devices}.json"


def mdp_json(num_devices: int, num_cores: int) -> str:
    """The tensor-slicing partition config: one partition over devices 0..N-1, p2p connected."""
    devices = list(range(num_devices))
    return _json({"connections": [{"devices": devices, "type": "p2p"}],
                  "partitions": [{"name": "Partition0",
                                  "devices": [{"deviceId": d, "numCores": num_cores} for d in devices]}]})


def side_files(o: QaicOptions, specs: list[dict[str, Any]], io_names: list[str]) -> dict[str, str]:
    """The text files written next to the QPC (file name -> content), node_precision_info excluded."""
    files = {SPECIALIZATIONS_FILE: specializations_json(specs, o.spec_format)}
    entries = vision_custom_io(io_names, o.io_precision) if o.io_precision is not None else []
    if o.kv_precision is not None:
        entries += kv_custom_io(io_names, o.kv_precision)
    if entries:
        files[CUSTOM_IO_FILE] = custom_io_yaml(entries)
    if o.num_devices > 1:
        files[mdp_file(o.num_devices)] = mdp_json(o.num_devices, o.num_cores)
    return files


def node_precision_digest(path: str) -> str:
    """sha256 of the node-precision file (its content, not its path, is part of the key)."""
    p = Path(path)
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError as exc:
        raise ManifestError(f"compile.qaic.node_precision_info: cannot read {p.resolve()}: {exc.strerror}",
                            key="compile.qaic.node_precision_info") from exc

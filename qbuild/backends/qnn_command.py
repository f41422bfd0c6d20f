"""The one module that knows QNN tool flags and config files: the two command lines and the side files, pure.

Facts: ../shared/reference/qefficient-modes.md section 2 (QEfficient's ``qnn_compiler.py``). Two tools run:
``qairt-converter`` (ONNX -> ``model.dlc``, with the custom IO config built from the specialisations),
then ``qnn-context-binary-generator`` (``model.dlc`` -> ``programqpc.bin``, configured by
``qnn_compiler_config.json`` which points at ``qnn_compile_backend.json``). Flags are in QEfficient's
order; each ``*_args_extension`` is appended last, split as the shell QEfficient runs it with would
split it (no expansion). Paths are built from the placeholders ``<onnx>`` and ``<out>`` (the artifact
directory, QEfficient's ``qpc_base_path``), so one function gives the command that runs and the path-free
one for plans; the program goes to ``<out>/qpc/`` (QEfficient: ``<qpc_base_path>/qpc-<hash>/``).

Two of QEfficient's mistakes are not repeated: it reads only the first two specialisations (graph names
``model_configuration_1/2``, a second shape per input), qbuild writes one graph and one shape per
specialisation; its ``qnn_data_format_config.json`` names ``model_configuration_1/2`` even for a single
graph (``model``), qbuild names the graphs the backend JSON names. ``SKIP_QNN_CONVERTER_STEP`` is refused
(there is no earlier ``model.dlc`` in a content-addressed artifact to reuse).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbuild.backends.qaic_command import KV_PRECISION
from qbuild.backends.qaic_command import _json as create_json
from qbuild.backends.qnn_sdk import BACKEND_LIB, EXTENSIONS_LIB, QnnSdk
from qbuild.errors import CompileError, ManifestError
from qbuild.manifest.schema import Manifest
from qbuild.plan.params import unkeyed

CUSTOM_IO_FILE = "custom_io_config.yaml"
SPECIALIZATIONS_FILE = "specializations.json"
DLC_FILE = "model.dlc"
BACKEND_JSON = "qnn_compile_backend.json"
COMPILER_CONFIG = "qnn_compiler_config.json"
TENSOR_SLICING = "tensor_slicing.json"
DATA_FORMAT = "qnn_data_format_config.json"
QPC_DIR = "qpc"
QPC_BINARY = "programqpc.bin"
CONTEXT_BIN_NAME = "qnngraph.serialized"
FLOAT_BIAS_BITWIDTH = "32"
FLOAT_BITWIDTH = "16"
CONVERTER_DEFAULT_ARGS = ("--preserve_io_datatype", "--onnx_skip_simplification", "--target_backend", "AIC")
LOG_LEVEL = "error"
MX_FORMAT = "QNN_TENSOR_DATA_FORMAT_MX"
#: the qnn_config keys QEfficient reads (constants L340-344)
CONVERTER_EXT = "converter_args_extension"
GENERATOR_EXT = "context_binary_generator_args_extension"
BACKEND_EXT = "qnn_compilation_backend"
SKIP_CONVERTER = "SKIP_QNN_CONVERTER_STEP"
#: flags an extension may not carry (QEfficient raises on them; constants L346-364)
IMMUTABLE_CONVERTER = ("--input_network", "--output_path", "--config", "--float_bias_bitwidth", "--float_bitwidth",
                       "--preserve_io_datatype", "--onnx_skip_simplification")
IMMUTABLE_GENERATOR = ("--binary_file", "--backend_binary", "--output_dir", "--backend", "--model", "--dlc_path",
                       "--config_file")
#: qnn_compile_backend.json keys a manifest option sets -> that option (compile.qnn.compilation_backend may not)
MANAGED_BACKEND_KEYS = {
    "compiler_num_of_cores": "compile.qnn.num_cores", "compiler_mxfp6_matmul_weights": "compile.qnn.mxfp6_matmul",
    "compiler_enable_depth_first": "compile.qnn.aic_enable_depth_first",
    "compiler_max_out_channel_split": "compile.qnn.mos", "compiler_mxint8_mdp_io": "compile.qnn.allow_mxint8_mdp_io",
    "compiler_mdp_load_partition_config": "compile.qnn.num_devices",
    "graph_names": "seq.lengths (one graph per specialisation)",
}


@dataclass(frozen=True)
class QnnOptions:
    """Everything the two commands and the side files depend on, resolved from the manifest (and qnn_config)."""

    num_cores: int
    mxfp6_matmul: bool
    num_devices: int
    depth_first: bool
    mos: int | None
    mxint8_mdp_io: bool
    kv_precision: str | None  # the retained-state KV's custom IO precision ("float16", "mxint8"); None: no KV
    mxint8: bool  # qnn_data_format_config.json and --data_format_config
    converter_ext: tuple[str, ...]
    generator_ext: tuple[str, ...]
    backend_overrides: tuple[tuple[str, str], ...]  # (key, JSON value) merged over qnn_compile_backend.json
    config: str | None = unkeyed(None, why="the qnn_config file's path; the values read from it are keyed")


@dataclass(frozen=True)
class Tensor:
    """A graph input or output as the custom IO config needs it: name, numpy dtype name, dims (int or symbol)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...] = ()


# --- the manifest and qnn_config ------------------------------------------------------------------------


def split_extension(text: str, key: str, immutable: tuple[str, ...], where: str = "") -> tuple[str, ...]:
    """An ``*_args_extension`` string as arguments; a flag the backend sets itself is a ManifestError."""
    try:
        tokens = tuple(shlex.split(text))
    except ValueError as exc:
        raise ManifestError(f"{key}: cannot split {text!r} into arguments{where} ({exc})", key=key) from exc
    bad = [t for t in tokens if t.split("=", 1)[0] in immutable]
    if bad:
        raise ManifestError(f"{key}: {', '.join(bad)}{where} is set by qbuild and may not be changed (QEfficient "
                            f"refuses it too); fixed flags: {', '.join(immutable)}", key=key,
                            hint="remove it from the extension")
    return tokens


def check_manifest(m: Manifest) -> None:
    """The compile.qnn checks that need no file: extensions split and free of fixed flags, no managed keys
    in ``compile.qnn.compilation_backend``."""
    q = m.compile.qnn
    split_extension(q.converter_args_extension, "compile.qnn.converter_args_extension", IMMUTABLE_CONVERTER)
    split_extension(q.context_binary_generator_args_extension, "compile.qnn.context_binary_generator_args_extension",
                    IMMUTABLE_GENERATOR)
    for name in q.compilation_backend:
        if name in MANAGED_BACKEND_KEYS:
            key = f"compile.qnn.compilation_backend.{name}"
            raise ManifestError(f"{key}: set by qbuild; use {MANAGED_BACKEND_KEYS[name]} instead", key=key)


def read_qnn_config(path: str) -> dict[str, Any]:
    """A QEfficient ``qnn_config`` JSON file, checked: its three keys' types, no SKIP_QNN_CONVERTER_STEP."""
    key = "compile.qnn.config"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"{key}: cannot read {Path(path).resolve()}: {exc.strerror}", key=key) from exc
    except ValueError as exc:
        raise ManifestError(f"{key}: {path} is not valid JSON ({exc})", key=key) from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{key}: {path} must hold a JSON object, got {type(data).__name__}", key=key)
    for name, kind in ((CONVERTER_EXT, str), (GENERATOR_EXT, str), (BACKEND_EXT, dict), (SKIP_CONVERTER, bool)):
        if name in data and not isinstance(data[name], kind):
            raise ManifestError(f"{key}: {name} in {path} must be a {'JSON object' if kind is dict else kind.__name__}"
                                f", got {data[name]!r}", key=key)
    if data.get(SKIP_CONVERTER):
        raise ManifestError(f"{key}: {SKIP_CONVERTER}: true in {path} is not supported: qbuild runs the converter "
                            "into the artifact, so there is no earlier model.dlc to reuse", key=key,
                            hint=f"set {SKIP_CONVERTER} to false or remove it")
    return data


def _extension(manifest_text: str, file: dict[str, Any], name: str, immutable: tuple[str, ...],
               path: str | None) -> tuple[str, ...]:
    key = f"compile.qnn.{name}"
    if manifest_text and file.get(name):
        raise ManifestError(f"{key}: also set in compile.qnn.config ({path}); set it in one place", key=key)
    if manifest_text:
        return split_extension(manifest_text, key, immutable)
    return split_extension(file.get(name, ""), "compile.qnn.config", immutable, f" ({name} in {path})")


def options(m: Manifest, *, retained_state: bool, graph_dtype: str) -> QnnOptions:
    """Resolve ``compile.qnn`` (and its qnn_config file) into :class:`QnnOptions`. ``graph_dtype``: the
    exported graph's float dtype, which sets the retained-state KV's precision (float16 for float32)."""
    q = m.compile.qnn
    check_manifest(m)
    file = read_qnn_config(q.config) if q.config else {}
    overrides = {**file.get(BACKEND_EXT, {}), **q.compilation_backend}
    kv = ("mxint8" if q.mxint8_kv_cache else KV_PRECISION[graph_dtype]) if retained_state else None
    return QnnOptions(
        num_cores=q.num_cores, mxfp6_matmul=q.mxfp6_matmul, num_devices=q.num_devices,
        depth_first=q.aic_enable_depth_first, mos=q.mos, mxint8_mdp_io=q.allow_mxint8_mdp_io, kv_precision=kv,
        mxint8=retained_state and q.mxint8_kv_cache,
        converter_ext=_extension(q.converter_args_extension, file, CONVERTER_EXT, IMMUTABLE_CONVERTER, q.config),
        generator_ext=_extension(q.context_binary_generator_args_extension, file, GENERATOR_EXT,
                                 IMMUTABLE_GENERATOR, q.config),
        backend_overrides=tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in overrides.items())),
        config=q.config)


# --- the two commands -----------------------------------------------------------------------------------


def converter_argv(sdk: QnnSdk, o: QnnOptions, *, onnx: str = "<onnx>", out: str = "<out>") -> list[str]:
    """``qairt-converter``: the ONNX graph -> ``<out>/model.dlc`` (qnn_compiler.py L228-260)."""
    return [sdk.converter, "--input_network", onnx, "--output_path", f"{out}/{DLC_FILE}",
            "--config", f"{out}/{CUSTOM_IO_FILE}", "--float_bias_bitwidth", FLOAT_BIAS_BITWIDTH,
            "--float_bitwidth", FLOAT_BITWIDTH, *CONVERTER_DEFAULT_ARGS, *o.converter_ext]


def generator_argv(sdk: QnnSdk, o: QnnOptions, *, out: str = "<out>") -> list[str]:
    """``qnn-context-binary-generator``: ``model.dlc`` -> ``<out>/qpc/programqpc.bin`` (L262-313);
    ``--log_level error`` unless the extension sets a log level."""
    cmd = [sdk.generator, "--binary_file", CONTEXT_BIN_NAME, "--backend_binary", QPC_BINARY,
           "--output_dir", f"{out}/{QPC_DIR}", "--backend", sdk.lib(BACKEND_LIB), "--dlc_path", f"{out}/{DLC_FILE}",
           "--config_file", f"{out}/{COMPILER_CONFIG}"]
    if o.mxint8:
        cmd += ["--data_format_config", f"{out}/{DATA_FORMAT}"]
    if not any(t.split("=", 1)[0] == "--log_level" for t in o.generator_ext):
        cmd += ["--log_level", LOG_LEVEL]
    return cmd + list(o.generator_ext)


# --- the side files -------------------------------------------------------------------------------------


def graph_names(count: int) -> list[str]:
    """One graph per specialisation: ``model`` alone, else ``model_configuration_1..N`` (QEfficient: 1..2)."""
    return ["model"] if count == 1 else [f"model_configuration_{i}" for i in range(1, count + 1)]


def backend_config(o: QnnOptions, count: int, *, out: str = "<out>") -> dict[str, Any]:
    """``qnn_compile_backend.json``: QEfficient's defaults (L133-171), then the overrides."""
    cfg: dict[str, Any] = {
        "compiler_compilation_target": "hardware", "compiler_hardware_version": "2.0",
        "compiler_convert_to_FP16": True, "compiler_retained_state": True, "graph_names": graph_names(count),
        "compiler_enable_depth_first": o.depth_first, "compiler_mxfp6_matmul_weights": o.mxfp6_matmul,
        "compiler_num_of_cores": o.num_cores, "compiler_do_DDR_to_multicast": True, "compiler_perfWarnings": False,
        "compiler_printDDRStats": False, "compiler_printPerfMetrics": False, "compiler_stat_level": 10,
        "compiler_stats_batch_size": 1, "compiler_time_passes": False, "compiler_mxint8_mdp_io": o.mxint8_mdp_io}
    if o.mos is not None and o.mos > 0:
        cfg["compiler_max_out_channel_split"] = str(o.mos)
    if o.num_devices > 1:
        cfg["compiler_mdp_load_partition_config"] = f"{out}/{TENSOR_SLICING}"
    for key, value in o.backend_overrides:
        cfg[key] = json.loads(value)
    return cfg


def compiler_config(sdk: QnnSdk, *, out: str = "<out>") -> dict[str, Any]:
    """``qnn_compiler_config.json``: where the backend JSON and the extensions library are (L173-191)."""
    return {"backend_extensions": {"config_file_path": f"{out}/{BACKEND_JSON}",
                                   "shared_library_path": sdk.lib(EXTENSIONS_LIB)}}


def tensor_slicing(num_devices: int) -> dict[str, Any]:
    """``tensor_slicing.json``: one partition over devices 0..N-1, p2p connected (L113-131)."""
    devices = list(range(num_devices))
    return {"connections": [{"devices": devices, "type": "p2p"}],
            "partitions": [{"name": "Partition0", "devices": [{"deviceId": d} for d in devices]}]}


def _shape(t: Tensor, spec: dict[str, Any]) -> str:
    """``(1, 32)``: the tensor's dims with its symbols taken from one specialisation."""
    dims = []
    for d in t.dims:
        if isinstance(d, int):
            dims.append(str(d))
            continue
        if not d or d not in spec["symbols"]:
            what = f"dimension {d!r}" if d else "a dimension with neither a size nor a name"
            raise CompileError(f"custom IO config: input {t.name!r} has {what}, which specialisation {spec['name']} "
                               f"does not give (symbols: {', '.join(spec['symbols'])})",
                               hint="the export's dynamic axes and the task's specialisations must use the same names")
        dims.append(str(int(spec["symbols"][d])))
    return "(" + ", ".join(dims) + ")"


def input_shape(t: Tensor, specs: list[dict[str, Any]]) -> str:
    """One shape, or one per specialisation (``"(1, 32), (1, 1)"``) when the input is input_ids/position_ids or
    one of its symbols differs between specialisations (QEfficient's rule, over all of them, not the first two)."""
    symbols = [d for d in t.dims if isinstance(d, str)]
    first = specs[0]["symbols"]
    varies = len(specs) > 1 and (t.name in ("input_ids", "position_ids") or any(
        s["symbols"].get(d) != first.get(d) for s in specs[1:] for d in symbols))
    return ", ".join(_shape(t, s) for s in (specs if varies else specs[:1]))


def _data_type(t: Tensor, custom_io: dict[str, str]) -> str:
    dtype = custom_io.get(t.name, t.dtype)
    return "uint8" if dtype == "mxint8" else dtype


def custom_io_config(inputs: list[Tensor], outputs: list[Tensor], specs: list[dict[str, Any]],
                     custom_io: dict[str, str]) -> str:
    """``custom_io_config.yaml`` for the converter (generate_qnn_specialization): inputs with DataType and Shape,
    outputs with DataType; a ``custom_io`` precision overrides the graph's dtype, ``mxint8`` -> ``uint8``."""
    import yaml

    data = {"Input Tensor Configuration": [
                {"Name": t.name, "Desired Model Parameters": {"DataType": _data_type(t, custom_io),
                                                              "Shape": input_shape(t, specs)}} for t in inputs],
            "Output Tensor Configuration": [
                {"Name": t.name, "Desired Model Parameters": {"DataType": _data_type(t, custom_io)}} for t in outputs]}
    return str(yaml.dump(data, default_flow_style=False, sort_keys=False))


def data_format_config(io_names: list[str], graphs: list[str]) -> str:
    """``qnn_data_format_config.json`` (mxint8): every past_key/past_value input and output (``.`` -> ``_``) in
    the MX format, per graph; written as QEfficient's ``json.dump(..., indent=4)``."""
    kv = [n.replace(".", "_") for n in io_names if "past_key" in n or "past_value" in n]
    return json.dumps({"graphs": [{"graph_name": g, "tensors": [{"tensor_name": n, "dataFormat": MX_FORMAT}
                                                                 for n in kv]} for g in graphs]}, indent=4)


def side_files(sdk: QnnSdk, o: QnnOptions, specs: list[dict[str, Any]], inputs: list[Tensor], outputs: list[Tensor],
               custom_io: dict[str, str], *, out: str = "<out>") -> dict[str, str]:
    """The text files written into the artifact before the tools run (file name -> content)."""
    from qbuild.backends.qaic_command import specializations_json

    files = {CUSTOM_IO_FILE: custom_io_config(inputs, outputs, specs, custom_io),
             SPECIALIZATIONS_FILE: specializations_json(specs, "named"),
             BACKEND_JSON: create_json(backend_config(o, len(specs), out=out)),
             COMPILER_CONFIG: create_json(compiler_config(sdk, out=out))}
    if o.num_devices > 1:
        files[TENSOR_SLICING] = create_json(tensor_slicing(o.num_devices))
    if o.mxint8:
        files[DATA_FORMAT] = data_format_config([t.name for t in [*inputs, *outputs]], graph_names(len(specs)))
    return files

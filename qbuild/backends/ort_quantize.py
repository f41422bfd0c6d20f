"""Weight quantisation for the ONNX Runtime backend: int8 dynamic (MatMulInteger), int8_block and int4
(MatMulNBits, blocks of 32 weights along K with one scale each).

- ``int8``: per-channel int8 weights, activations quantised per tensor at run time (DynamicQuantizeMatMul).
  The fastest int8 at many rows (encoders, long prefills: 2x fp32 on all-MiniLM-L6-v2), but one scale for a
  whole activation tensor: on all-MiniLM-L6-v2 with every MatMul quantised the minimum cosine to
  sentence-transformers is 0.985.
- ``int8_block``: int8 weights per block of 32, activations quantised per block (the Q8_0 scheme of llama.cpp).
  On all-MiniLM-L6-v2 the minimum cosine is 0.9991 (1 - cosine 16x smaller); on the 100M bench Llama the logit
  error is 0.027 of the fp32 logits' spread against int8's 0.042 at about int8's decode speed (bench/decode.py,
  six runs), but a 128-token prefill takes 48-57 ms against int8's 39-40 and fp32's 65-67 (bench/decode.py's
  model, median of 7 interleaved rounds, three runs).
- ``int4``: the same blocks with 4-bit weights, asymmetric (a zero point per block besides the scale, so the
  16 levels span the block's own minimum to maximum rather than plus and minus its largest magnitude). On a
  trained 5M Llama (bench/quant_trained.py: Python's documentation, held-out text) asymmetric int4 raised the
  held-out loss by 0.0023 nats per token against symmetric's 0.0107, and teacher-forced top-1 agreement with
  fp32 was 93.4% against 92.1%, at about the same decode speed on the 100M bench Llama (asymmetric /
  symmetric tok/s per round, 12 interleaved rounds: median 1.02, 1.00, 0.97 and 0.97 in four runs).
  int8_block stays symmetric (99% agreement). A causal LM's output head (the MatMuls that write ``logits``,
  :func:`output_head`) is quantised as int8_block under int4, as llama.cpp's Q4_K_M keeps its output projection
  at 6 bits: on the trained Llama it lifts teacher-forced top-1 agreement from 93.4% to 95.6% (the same as
  keeping the head in fp32; median per passage 96.1%) and greedy agreement over 128 tokens from 14% to 36% (mean
  of 8 prompts), for 8 instead of 4 bits on one MatMul per model; the held-out loss increase went from 0.0023 to
  0.0033 nats per token (both small: int8_block's is 0.0002).

The block modes run float32 graphs with ``accuracy_level`` 4: activations quantised to int8 per block and
MLAS's integer kernels, instead of dequantising the weights to fp32 (float16 graphs: level 1, see
``ACCURACY_LEVEL``). On the 100M bench Llama, int4 against the default level (medians of 7 interleaved rounds,
three runs): decode 262-281 vs 207-226 tok/s (1.16-1.30x) and a 32-token prefill 33-44 vs 47-49 ms, but a
128-token prefill 87-98 vs 68-70 ms, with the same logit error (0.338 vs 0.338 of the fp32 logits' spread:
int4 weight rounding dwarfs the activations' int8 rounding). Decode dominates generation, so level 4 it is;
long prompts pay ~30% more prefill.

Any mode with a cosine floor (``compile.onnxruntime.quantize_min_cosine``) chooses by measurement
which MatMuls stay in fp32: every MatMul's sensitivity is measured alone (only it quantised: 1 - the mean
cosine of the outputs to the fp32 model's on the calibration inputs), then the most sensitive are kept in
fp32, one at a time, until the minimum cosine of the whole quantised model reaches the floor. On
all-MiniLM-L6-v2 (int8) the two FFN output projections of layers 0 and 2 come first (on random tokens as on
text) and keeping them lifts the minimum cosine to sentence-transformers from 0.985 to 0.992 on 256 texts. On the
trained Llama above, int4 (its head in int8 blocks) with a floor of 0.999 keeps layer 0's q, k and down projections
(3 of 29 MatMuls), which lifts teacher-forced top-1 agreement from 96% to 97%.
It costs one quantisation per MatMul, once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qbuild.errors import CompileError

#: weights per MatMulNBits block (one scale each), for int4 and int8_block
BLOCK = 32
#: MatMulNBits accuracy_level: 4 = int8 activations and integer dot products (see the module docstring); float16
#: graphs get 1 (fp32 compute): at 4, MLAS's float16 path lost accuracy (tiny Llama's prefill logits: correlation
#: with the unquantised float16 model 0.964 for int8_block and 0.950 for int4, against 0.99993 and 0.985 at 1;
#: float32 graphs give 0.9999 at 4)
ACCURACY_LEVEL, ACCURACY_LEVEL_FLOAT16 = 4, 1
#: quantisation modes and their weight bits (None: dynamic int8, MatMulInteger)
MODES = {"int8": None, "int8_block": 8, "int4": 4}
#: MatMulNBits blocks without a zero point (symmetric) per weight bits: int4 is asymmetric (module docstring)
SYMMETRIC = {8: True, 4: False}
#: the mode a causal LM's output head is quantised with, where it differs from the body's (module docstring)
HEAD_MODE = {"int4": "int8_block"}


def quantize(onnx_path: Path, out_path: Path, mode: str, *, min_cosine: float | None = None,
             calibration: Sequence[Mapping[str, Any]] = (), optimization: str = "extended") -> dict[str, Any]:
    """Write a weight-quantised copy of ``onnx_path`` to ``out_path`` (external data beside it); with
    ``min_cosine`` it keeps the most sensitive MatMuls in fp32 until the outputs on ``calibration`` reach it
    (both models run with the artifact's graph ``optimization``: fusions change quantised numerics)."""
    import onnx

    if mode not in MODES:
        raise CompileError(f"compile.onnxruntime.quantize: unknown mode {mode!r}; choose none, "
                           + ", ".join(MODES))
    types = _matmul_weight_types(onnx_path)
    if MODES[mode] is None:
        _check_float32(types, onnx_path, mode)
    level = ACCURACY_LEVEL if types <= {"float32"} else ACCURACY_LEVEL_FLOAT16
    search: dict[str, Any] = {}
    try:
        if min_cosine is not None:
            if not calibration:
                raise CompileError("compile.onnxruntime.quantize_min_cosine: the task gives no calibration inputs "
                                   "to measure the cosine on", hint="unset it (null) for this model")
            search = _to_cosine(mode, onnx_path, out_path, min_cosine, calibration, optimization, level)
        else:
            _quantize(mode, onnx_path, out_path, level)
    except CompileError:
        raise
    except Exception as exc:
        raise CompileError(f"compile.onnxruntime.quantize={mode}: quantising {onnx_path} failed: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    model = onnx.load(str(out_path), load_external_data=False)
    ops = sorted({n.op_type for n in model.graph.node})
    block = MODES[mode] is not None
    head = sorted(set(output_head(onnx.load(str(onnx_path), load_external_data=False).graph))
                  - set(search.get("kept_fp32", ()))) if mode in HEAD_MODE else []
    return {"quantize": mode, "ops": ops, "block_size": BLOCK if block else None,
            "accuracy_level": level if block else None,
            "symmetric": SYMMETRIC[MODES[mode]] if block else None,
            **({"head": {"matmuls": head, "quantize": HEAD_MODE[mode]}} if head else {}), **search}


def output_head(graph: Any) -> list[str]:
    """The constant-weight MatMuls that write a causal LM's ``logits`` output: its output projection, one MatMul or
    several (an export may split it along the vocabulary), found by walking back from ``logits`` through any other
    ops and stopping at each MatMul. A graph without a ``logits`` output has none."""
    if "logits" not in {o.name for o in graph.output}:
        return []
    producer = {out: node for node in graph.node for out in node.output}
    weights = {t.name for t in graph.initializer}
    heads, seen, todo = set(), set(), ["logits"]
    while todo:
        node = producer.get(todo.pop())
        if node is None or id(node) in seen:  # by identity: exports may leave node names empty
            continue
        seen.add(id(node))
        if node.op_type == "MatMul":
            if node.input[1] in weights:
                heads.add(node.name)
            continue
        todo.extend(node.input)
    return sorted(heads)


def _matmul_weight_types(onnx_path: Path) -> set[str]:
    """The numpy dtype names of the constant MatMul weights of ``onnx_path`` (what quantisation touches)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {t.name: t.data_type for t in graph.initializer}
    return {onnx.helper.tensor_dtype_to_np_dtype(weights[n.input[1]]).name
            for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights}


def _check_float32(types: set[str], onnx_path: Path, mode: str) -> None:
    """Dynamic int8 quantises float32 MatMuls only: on a float16 graph ONNX Runtime's quantiser writes a model
    that fails to load with a type error naming a graph node; say what to change instead."""
    if types - {"float32"}:
        raise CompileError(f"compile.onnxruntime.quantize={mode}: dynamic int8 quantises float32 MatMuls only, and "
                           f"{onnx_path.name} has {', '.join(sorted(types - {'float32'}))} weights (model.dtype)",
                           hint="use compile.onnxruntime.quantize=int8_block (MatMulNBits takes float16), or "
                                "model.dtype=float32")


def _quantize(mode: str, onnx_path: Path, out_path: Path, level: int = ACCURACY_LEVEL, exclude: Sequence[str] = (),
              only: Sequence[str] | None = None) -> None:
    """Quantise the MatMuls with constant weights (``only`` these, if given; never those in ``exclude``); a causal
    LM's output head in its ``HEAD_MODE``, in a second pass."""
    bits = MODES[mode]
    if bits is None:
        _int8(onnx_path, out_path, exclude, only)
        return
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    chosen = ({n.name for n in graph.node} if only is None else set(only)) - set(exclude)
    head = set(output_head(graph)) & chosen if mode in HEAD_MODE else set()
    if not head:
        _nbits(onnx_path, out_path, bits, level, chosen)
        return
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        body = Path(tmp) / "model.onnx"
        _nbits(onnx_path, body, bits, level, chosen - head)
        _nbits(body, out_path, MODES[HEAD_MODE[mode]], level, head)


def _nbits(onnx_path: Path, out_path: Path, bits: int, level: int, names: set[str]) -> None:
    """MatMulNBits of ``bits`` for the constant-weight MatMuls named ``names``, the graph's other nodes untouched."""
    import onnx

    # the quantiser's nodes_to_include adds to its op types, it does not restrict them: exclude all the others
    skip = {n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node} - names
    q = _nbits_quantizer()(str(onnx_path), bits=bits, block_size=BLOCK, is_symmetric=SYMMETRIC[bits],
                             accuracy_level=level, nodes_to_exclude=sorted(skip))
    q.process()
    q.model.save_model_to_file(str(out_path), use_external_data_format=True)


def _nbits_quantizer() -> Any:
    """ONNX Runtime's MatMulNBitsQuantizer, imported without its side effect: the module calls
    ``logging.basicConfig(level=INFO)`` on import, which set the whole process's root logger to INFO and printed a
    line per graph node of every build; the root logger is put back and the module's logger kept to warnings."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def _int8(onnx_path: Path, out_path: Path, exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(onnx_path, out_path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, use_external_data_format=True, nodes_to_exclude=list(exclude),
                     nodes_to_quantize=list(only) if only is not None else None)


_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _outputs(model: Path, calibration: Sequence[Mapping[str, Any]], optimization: str) -> list[Any]:
    """The first output of ``model`` per calibration feed, rows flattened: ``[rows, -1]``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    from qbuild.runtime.onnxruntime import DISABLED_OPTIMIZERS  # the artifact's own graph, as it will run

    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=DISABLED_OPTIMIZERS)
    return [session.run(None, dict(feed))[0].reshape(len(next(iter(feed.values()))), -1) for feed in calibration]


def cosines(reference: Sequence[Any], got: Sequence[Any]) -> Any:
    """Cosine similarity of each row of ``got`` to the same row of ``reference`` (all feeds concatenated)."""
    import numpy as np

    a, b = np.concatenate(list(reference)).astype(np.float64), np.concatenate(list(got)).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-30)


def _to_cosine(mode: str, onnx_path: Path, out_path: Path, floor: float, calibration: Sequence[Mapping[str, Any]],
               optimization: str, level: int = ACCURACY_LEVEL) -> dict[str, Any]:
    """``mode`` with the fewest most-sensitive MatMuls in fp32 such that the minimum cosine reaches ``floor``."""
    import onnx

    reference = _outputs(onnx_path, calibration, optimization)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # what is quantised
    _quantize(mode, onnx_path, out_path, level)
    measured = [float(cosines(reference, _outputs(out_path, calibration, optimization)).min())]
    kept: list[str] = []
    if measured[0] < floor:
        with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
            alone = Path(tmp) / "model.onnx"
            sensitivity = {}
            for name in matmuls:
                _quantize(mode, onnx_path, alone, level, only=[name])
                sensitivity[name] = 1.0 - float(cosines(reference, _outputs(alone, calibration, optimization)).mean())
        for name in sorted(matmuls, key=lambda n: -sensitivity[n]):
            kept.append(name)
            _quantize(mode, onnx_path, out_path, level, exclude=kept)
            measured.append(float(cosines(reference, _outputs(out_path, calibration, optimization)).min()))
            if measured[-1] >= floor:
                break
    rows = sum(len(next(iter(f.values()))) for f in calibration)
    return {"min_cosine_floor": floor, "min_cosine": measured[-1], "min_cosine_all_quantised": measured[0],
            "kept_fp32": kept, "matmuls": len(matmuls),
            "calibration_rows": rows}

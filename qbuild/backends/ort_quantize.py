"""Weight quantisation for the ONNX Runtime backend: int8 dynamic (MatMulInteger) and int4 MatMulNBits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qbuild.errors import CompileError

INT4_BLOCK = 32


def quantize(onnx_path: Path, out_path: Path, mode: str) -> dict[str, Any]:
    """Write a weight-quantised copy of ``onnx_path`` to ``out_path`` (external data beside it)."""
    import onnx

    try:
        if mode == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(onnx_path, out_path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             per_channel=True, use_external_data_format=True)
        elif mode == "int4":
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(str(onnx_path), bits=4, block_size=INT4_BLOCK, is_symmetric=True)
            q.process()
            q.model.save_model_to_file(str(out_path), use_external_data_format=True)
        else:
            raise CompileError(f"compile.onnxruntime.quantize: unknown mode {mode!r}; choose none, int8 or int4")
    except CompileError:
        raise
    except Exception as exc:
        raise CompileError(f"compile.onnxruntime.quantize={mode}: quantising {onnx_path} failed: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    model = onnx.load(str(out_path), load_external_data=False)
    ops = sorted({n.op_type for n in model.graph.node})
    return {"quantize": mode, "ops": ops, "block_size": INT4_BLOCK if mode == "int4" else None}

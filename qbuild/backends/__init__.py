"""Compile backends: turn an exported ONNX model into a runnable artifact."""

"""PyTorch -> ONNX exporters, one module per task."""

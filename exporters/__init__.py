"""Exporters: write a compressed in-memory model to disk (safetensors + config; ONNX)."""

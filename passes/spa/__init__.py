"""SPA: structured pruning of any ONNX model through coupled-channel groups found on its graph."""

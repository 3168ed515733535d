"""On-device serving: the Runtime seam (ONNX Runtime, later TFLite) and the local HTTP API."""

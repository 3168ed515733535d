"""On-device serving: the Runtime seam (ONNX Runtime, and TFLite through ai-edge-litert) and
the local HTTP API."""

"""ONNX Runtime: the one-graph export (uint8 image in, detections out) and its runner."""

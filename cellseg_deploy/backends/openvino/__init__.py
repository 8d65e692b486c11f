"""OpenVINO: the CPU runner (fp32, bf16 hint) and the int8 IR quantised from the ONNX graph."""

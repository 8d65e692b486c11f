"""Staged graphs: backbone+RPN, box head and mask head as separate graphs with the host steps in PyTorch;
the stage split, its export and its runners (ONNX Runtime or PyTorch per stage)."""

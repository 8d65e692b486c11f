"""PyTorch eager: the reference runner (a checkpoint, as trained)."""

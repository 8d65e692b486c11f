"""TensorRT: engines built from the stage graphs, their runner, and the thin layer over NVIDIA's bindings."""

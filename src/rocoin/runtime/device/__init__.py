"""A device: runs its group's student with onnxruntime and serves it over gRPC (no torch)."""

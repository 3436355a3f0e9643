"""Export EVF-SAM into three graphs (ONNX, then TensorRT plans); see `python -m export --help`."""

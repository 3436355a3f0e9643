"""Benchmarks of EVF-SAM deployments: eager PyTorch, in-process ONNX Runtime, Triton (perf_analyzer).

    python -m benchmarks.run --size tiny          # the CPU suite (`make bench`)
    python -m benchmarks.gpu_torch --size full    # PyTorch paths on a CUDA GPU (`make bench-gpu`)

See benchmarks/README.md for what is measured and how to read the results.
"""

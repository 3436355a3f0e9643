"""Benchmarks of EVF-SAM deployments: eager PyTorch, in-process ONNX Runtime, Triton (perf_analyzer).

    python -m benchmarks.run --size tiny          # the CPU suite of one family (`make bench`)
    python -m benchmarks.families --size vit-b    # EVF-SAM vs EVF-SAM2 side by side (`make bench-families`)
    python -m benchmarks.gpu_check                # GPU paths in <= 10 min on one H100/H200 (`make gpu-check`)

See benchmarks/README.md for what is measured and how to read the results.
"""

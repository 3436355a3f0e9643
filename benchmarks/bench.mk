# Benchmarks, included from the Makefile.  Results land in benchmarks/results/<machine>-<date>[-<size>]/.
#   make bench        CPU suite, tiny model, end to end (< 15 min on 2 cores): eager vs ORT vs Triton
#   make bench-full   the same suite on the full-size model (SAM ViT-H + BEiT-3 large): hours on a small CPU
#   make bench-gpu    PyTorch paths on a CUDA GPU (needs a CUDA build of torch: GPU_PY=python in an NGC container)
#   make bench-cluster replicas behind Envoy: affinity vs round robin, key remapping, a replica killed (< 15 min)
BENCH_SIZE ?= tiny
BENCH_ARGS ?=
GPU_PY ?= $(PY)
BENCH_GPU_ARGS ?=

.PHONY: bench bench-full bench-gpu bench-cluster

# perf_analyzer (tritonclient[all]==2.51.0, in the venv) links Debian's libb64.so.0d; where it is missing,
# benchmarks/perf_analyzer.py builds benchmarks/libb64_compat.c (same interface) with cc into build/libb64/.
bench: install
	$(PY) -m benchmarks.run --size $(BENCH_SIZE) --build-dir $(BUILD)/bench/$(BENCH_SIZE) $(BENCH_ARGS)

bench-full: install
	$(PY) -m benchmarks.run --size full --build-dir $(BUILD)/bench/full $(BENCH_ARGS)

bench-gpu: install
	$(GPU_PY) -m benchmarks.gpu_torch --device cuda --size full $(BENCH_GPU_ARGS)

bench-cluster: install
	$(PY) -m benchmarks.cluster --build-dir $(BUILD)/bench/cluster $(BENCH_ARGS)
